"""The training CLI, made to wait inside a known optimizer step for a signal that
``tests/test_interrupt.py`` sends from outside (SIGINT or SIGTERM, as a terminal or a cluster
scheduler would).

    python tests/interrupt_worker.py --wait_in_step 6 MARKER [--signals 2] -- --config configs/quickstart.yaml ...

At the start of step N (the one that makes ``global_step`` N) the worker writes MARKER, then
waits until it has received ``--signals`` signals (default 1); the step then finishes as usual.
With ``--signals 2`` it keeps waiting after the first, so the second one arrives while the step
is still running (it must abort the run at once).  Everything after ``--`` goes to
:func:`emo_trainer.cli.main`; the exit code is main's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--wait_in_step", nargs=2, metavar=("STEP", "MARKER"), required=True)
    p.add_argument("--signals", type=int, default=1)
    a = p.parse_args(argv[:split])
    step, marker = int(a.wait_in_step[0]), a.wait_in_step[1]

    from transformers import TrainerCallback

    from emo_trainer import cli

    handlers = []
    make = cli._interrupt_handler

    def recording():
        h = make()
        handlers.append(h)
        return h

    cli._interrupt_handler = recording

    class Wait(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step - 1:
                Path(marker).write_text("waiting\n")
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and (a.signals > 1 or handlers[-1].signum is None):
                    time.sleep(0.05)

    build = cli.build_trainer
    cli.build_trainer = lambda cfg, callbacks=None, **kw: build(cfg, callbacks=[*(callbacks or []), Wait()], **kw)
    return cli.main(argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
