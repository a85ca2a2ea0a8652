"""A checkpoint or the final model that cannot be written (a full disk) ends the run with ONE
line naming the last complete checkpoint, exit code 1, no traceback (issue 18); the half-written
checkpoint is not marked complete, so ``--resume_from_checkpoint true`` skips it."""

from __future__ import annotations

import errno
from pathlib import Path

from test_errors import QUICK, SMALL

from emo_trainer import trainer as trainer_mod
from emo_trainer.cli import main
from emo_trainer.trainer import COMPLETE_MARKER, last_complete_checkpoint


def _args(out: Path) -> list[str]:
    return ["--config", QUICK, *SMALL, "--output_dir", str(out), "--max_steps", "4", "--save_strategy", "steps",
            "--save_steps", "2"]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err[-3000:]
    return errors[0]


def test_disk_full_while_saving_a_checkpoint(tmp_path, capsys, monkeypatch):
    save = trainer_mod.save_objective_state

    def full_disk(objective, directory):
        if Path(directory).name == "checkpoint-4":
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(objective, directory)

    monkeypatch.setattr(trainer_mod, "save_objective_state", full_disk)
    out = tmp_path / "run"
    assert main(_args(out)) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"could not write {out / 'checkpoint-4'} (OSError: No space left on device)" in line, line
    assert f"the last complete checkpoint is {out / 'checkpoint-2'}" in line, line
    assert not (out / "checkpoint-4" / COMPLETE_MARKER).exists()
    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")


def test_disk_full_while_saving_the_final_model(tmp_path, capsys, monkeypatch):
    save_model = trainer_mod.ObjectiveTrainer.save_model

    def full_disk(self, output_dir=None, _internal_call=False):
        if Path(output_dir).name == "final":
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_model(self, output_dir, _internal_call)

    monkeypatch.setattr(trainer_mod.ObjectiveTrainer, "save_model", full_disk)
    out = tmp_path / "run"
    assert main(_args(out)) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"could not write {out / 'final'}" in line and f"the last complete checkpoint is {out / 'checkpoint-4'}" in line
