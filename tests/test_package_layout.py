"""The package layout of issue 16: user errors share one base class, and the old module paths of
moved modules still import (the same module object, with a DeprecationWarning)."""

import importlib
import subprocess
import sys
import warnings

from emo_trainer.errors import CheckpointError, ConfigError, DataError, MauveSampleError, ObjectiveError, UserError


def test_user_errors_share_one_base_and_stay_importable_where_they_were():
    from emo_trainer.config import ConfigError as config_error
    from emo_trainer.data import DataError as data_error
    from emo_trainer.evaluation.metrics.mauve import MauveSampleError as mauve_error
    from emo_trainer.objectives import ObjectiveError as objective_error

    assert (config_error, data_error, mauve_error, objective_error) == (ConfigError, DataError, MauveSampleError,
                                                                        ObjectiveError)
    for cls in (ConfigError, DataError, ObjectiveError, CheckpointError, MauveSampleError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)


def test_old_module_paths_import_the_moved_module():
    # a fresh interpreter: each warning fires on the first import only
    code = """
import importlib, warnings
from emo_trainer._compat import MOVED
for old, new in sorted(MOVED.items()):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = importlib.import_module(old)
    assert a is importlib.import_module(new), (old, a)
    assert any(issubclass(x.category, DeprecationWarning) and new in str(x.message) for x in w), (old, w)
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_old_submodule_path_of_a_moved_package_is_the_same_module():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = importlib.import_module("emo_trainer.metrics.repetition")
        from emo_trainer.objectives import triton_stats  # attribute of the old package: the moved module
    assert old is importlib.import_module("emo_trainer.evaluation.metrics.repetition")
    assert triton_stats is importlib.import_module("emo_trainer.ops.triton_stats")


def test_public_api_is_unchanged():
    from emo_trainer import ObjectiveTrainer, get_objective, load_config  # noqa: F401
    from emo_trainer.objectives import available, chunked_objective_loss  # noqa: F401
    from emo_trainer.objectives.sequencematch import SequenceMatchObjective  # noqa: F401

    assert available() == ["dft", "eaft", "emo", "focal", "mile", "mixce", "mle", "sequencematch", "tailr"]


def test_the_package_never_imports_its_own_old_paths():
    """The library's own code uses the new module paths: loading a config with decodings (which once
    went through emo_trainer.eval_config) and importing every module warns of no moved path."""
    import pkgutil
    import subprocess
    import sys
    from pathlib import Path

    import emo_trainer

    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"

    names = [m.name for m in pkgutil.walk_packages(emo_trainer.__path__, "emo_trainer.")
             if "triton" not in m.name and "gpu_verify" not in m.name]
    code = ("import warnings, importlib; warnings.simplefilter('error', DeprecationWarning)\n"
            f"for n in {names!r}: importlib.import_module(n)\n"
            "from emo_trainer.config import load_config\n"
            f"load_config({str(quickstart)!r}, ['--eval.decodings=[{{top_p: 0.95}}]'])\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
