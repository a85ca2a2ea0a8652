"""Old import paths of modules that moved in the package redesign (issue 16), kept for one release.

``import emo_trainer.backspace`` (or any other path below) still works: it returns the module at
its new place — the same module object, so attributes, private helpers and ``monkeypatch`` targets
are shared — and emits a ``DeprecationWarning`` naming the new path.  There is no file at the old
path: an import hook installed by ``emo_trainer/__init__.py`` maps the old names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module path -> new module path (a moved package maps its submodules too).
MOVED: dict[str, str] = {
    "emo_trainer.attention": "emo_trainer.objectives.sequencematch.attention",
    "emo_trainer.backspace": "emo_trainer.objectives.sequencematch.backspace",
    "emo_trainer.backspace_tree": "emo_trainer.objectives.sequencematch.tree",
    "emo_trainer.backspace_generation": "emo_trainer.objectives.sequencematch.sampler",
    "emo_trainer.replay": "emo_trainer.objectives.sequencematch.replay",
    "emo_trainer.objectives.fused": "emo_trainer.ops.fused",
    "emo_trainer.objectives.chunked": "emo_trainer.ops.chunked",
    "emo_trainer.objectives.triton_stats": "emo_trainer.ops.triton_stats",
    "emo_trainer.eval_config": "emo_trainer.evaluation.config",
    "emo_trainer.prompts": "emo_trainer.evaluation.prompts",
    "emo_trainer.generation": "emo_trainer.evaluation.generation",
    "emo_trainer.sharding": "emo_trainer.evaluation.sharding",
    "emo_trainer.metrics": "emo_trainer.evaluation.metrics",
}


def new_name(old: str) -> str | None:
    """The new path of module ``old``, or None if it did not move."""
    if old in MOVED:
        return MOVED[old]
    for prefix, target in MOVED.items():
        if old.startswith(prefix + "."):
            return target + old[len(prefix):]
    return None


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None  # a throw-away module; exec_module puts the real one in sys.modules

    def exec_module(self, module):
        old = module.__name__
        new = new_name(old)
        warnings.warn(f"{old} moved to {new}; the old import path will be removed in the next release",
                      DeprecationWarning, stacklevel=2)
        # the import system returns (and binds on the parent package) what sys.modules holds now
        sys.modules[old] = importlib.import_module(new)


def install() -> None:
    """Put the alias hook first on ``sys.meta_path`` (once): it must answer before the path finder
    would load a second copy of a moved package's submodule under its old name."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
