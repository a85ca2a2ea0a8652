"""The training CLI, made to stop at a known point so that ``tests/test_resume.py`` can SIGKILL it.

    python tests/resume_worker.py --pause_after_step 6 MARKER -- --config configs/quickstart.yaml ...
    python tests/resume_worker.py --pause_in_save 8 MARKER -- --config ...

``--pause_after_step N``: after optimizer step N (between two checkpoints) write MARKER and sleep.
``--pause_in_save N``: while checkpoint-N is being written — model, optimizer and trainer state
already on disk, objective state and completion marker not yet — write MARKER and sleep.
The test kills the sleeping process with SIGKILL, the way a crash or a pre-empted job dies.
Everything after ``--`` goes to :func:`emo_trainer.cli.main` unchanged.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sleep_forever(marker: str) -> None:
    Path(marker).write_text("paused\n")
    while True:  # until SIGKILL
        time.sleep(1.0)


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--pause_after_step", nargs=2, metavar=("STEP", "MARKER"))
    p.add_argument("--pause_in_save", nargs=2, metavar=("STEP", "MARKER"))
    a = p.parse_args(argv[:split])

    from transformers import TrainerCallback

    from emo_trainer import cli
    from emo_trainer import trainer as trainer_mod

    if a.pause_after_step:
        step, marker = int(a.pause_after_step[0]), a.pause_after_step[1]

        class Pause(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    _sleep_forever(marker)

        build = cli.build_trainer
        cli.build_trainer = lambda cfg, callbacks=None, **kw: build(cfg, callbacks=[*(callbacks or []), Pause()], **kw)
    if a.pause_in_save:
        step, marker = int(a.pause_in_save[0]), a.pause_in_save[1]
        save = trainer_mod.save_objective_state

        def save_then_pause(objective, directory):
            if Path(directory).name == f"checkpoint-{step}":
                _sleep_forever(marker)
            return save(objective, directory)

        trainer_mod.save_objective_state = save_then_pause
    return cli.main(argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
