"""Experiment configuration: one YAML file, every key overridable on the command line.

A config has five sections (see ``configs/*.yaml`` for every key with a comment)::

    model:      ModelConfig       which model/tokenizer to load or build
    data:       DataConfig        where the text comes from and how it is cut into blocks
    objective:  ObjectiveConfig   the training objective and its options (one sub-dict per objective)
    eval:       EvalConfig        generation metrics run at every evaluation
    training:   transformers.TrainingArguments keys (output_dir, learning_rate, ...)

Command-line overrides (TRL/torchtune style), applied after the YAML::

    --objective mixce            # shortcut for objective.name
    --learning_rate 3e-5         # a key that exists in exactly one section
    --emo.mode 2                 # an objective's option (same as --objective.emo.mode 2)
    --data.block_size 128        # any key by its section
    eval.num_prompts=200         # torchtune's key=value form works too

Unknown keys, unknown objectives, wrong types and out-of-range values raise
:class:`ConfigError` with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError
from .evaluation.config import EvalConfig
from .objectives import ObjectiveError, objective_class, objective_options
from .objectives.registry import available

logger = logging.getLogger(__name__)

SECTIONS = ("model", "data", "objective", "eval", "training")




# --------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """The ``model:`` section."""

    #: Hub id or local directory of a pretrained causal LM (e.g. ``gpt2``). Leave null to build
    #: a fresh model from ``config``.
    name_or_path: str | None = None
    #: Build a fresh (randomly initialised) model from this config dict, e.g.
    #: ``{model_type: gpt2, n_layer: 2, n_embd: 128, n_head: 4, n_positions: 256}``.
    #: ``vocab_size`` is taken from the tokenizer when omitted.
    config: dict | None = None
    #: Hub id or local directory of the tokenizer; defaults to ``name_or_path``.
    tokenizer: str | None = None
    #: Train a byte-level BPE tokenizer of this vocabulary size on the training text instead of
    #: loading one (offline quickstart). Saved with the run.
    train_tokenizer_vocab_size: int | None = None
    #: Weights dtype when loading: ``auto`` (as saved), ``float32``, ``bfloat16`` or ``float16``.
    #: Mixed precision is chosen with ``training.bf16`` / ``training.fp16``.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    #: Attention kernel (``eager``, ``sdpa``, ``flash_attention_2``); null = transformers' default.
    attn_implementation: str | None = None
    #: Allow code from the model repository to run. Off unless you trust the repository.
    trust_remote_code: bool = False
    #: LoRA adapters (needs the ``lora`` extra): ``{r: 32, alpha: 16, dropout: 0.05,
    #: target_modules: [q_proj, v_proj]}``; null = full fine-tuning.
    lora: dict | None = None


@dataclass
class DataConfig:
    """The ``data:`` section."""

    #: Hub dataset name (``wikitext``), or ``builtin:quickstart`` for the embedded corpus.
    dataset: str | None = None
    #: Hub dataset config name (``wikitext-2-raw-v1``).
    dataset_config: str | None = None
    #: Local training files (.txt: one document per line; .jsonl/.json; .parquet; .csv).
    train_files: list[str] | None = None
    #: Local validation files; when none exist, ``validation_split_percentage`` of train is carved out.
    validation_files: list[str] | None = None
    #: Column holding the text.
    text_column: str = "text"
    #: Tokens per training example.
    block_size: int = 256
    #: Pack documents into contiguous ``block_size`` blocks (the EMO/run_clm setting); false = one
    #: document per example, truncated to ``block_size`` and padded (the MixCE setting).
    packing: bool = True
    #: Append the EOS token to each document (trained on; padding never is).
    add_eos: bool = False
    #: Percent of the training split used for validation when the dataset has no validation split.
    validation_split_percentage: float = 5.0
    #: Keep at most this many training / validation documents (null = all).
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    #: Drop documents with fewer characters than this (after stripping).
    min_chars: int = 1
    #: Worker processes for tokenisation (null = 1 for small data, else up to 8).
    num_proc: int | None = None
    #: Calibration-set mode: split documents into sentences and sample this many (null = off).
    calibration_sentences: int | None = None
    #: Minimum words of a calibration sentence (shorter ones and headings are dropped).
    calibration_min_words: int = 5
    #: Undo a corpus' tokenisation spaces in every split before use: ``wikitext`` (for the
    #: ``wiki.*.tokens`` files: `` @-@ `` → ``-``, `` , `` → ``,``...); null = text used as is.
    detokenize: Literal["wikitext"] | None = None


@dataclass
class ObjectiveConfig:
    """The ``objective:`` section.  Options of an objective go in a sub-dict named after it::

        objective:
          name: emo
          emo: {mode: 1, ratio_cap: 3.0}
          mixce: {eta: 0.1}     # ignored unless name is mixce; lets --objective mixce switch
    """

    #: One of ``mle``, ``emo``, ``mixce``, ``mile``, ``sequencematch``, ``dft``, ``tailr``, ``focal``,
    #: ``eaft`` (docs/objectives.md).
    name: str = "mle"
    #: ``full`` (the model computes the logits of the whole batch) or ``chunked`` (from hidden
    #: states in token chunks, recomputed in backward: never holds N×V logits; on GPUs with an
    #: odd vocabulary such as GPT-2's also the faster one — docs/performance.md).
    loss_path: Literal["full", "chunked"] = "full"
    #: Tokens per chunk on the chunked path.
    chunk_size: int = 2048
    #: What to do with a non-finite loss: ``raise`` (stop with a message naming step, objective and
    #: term) or ``skip`` (drop the micro-batch's gradient and count it in ``skipped_batches``).
    on_nonfinite: Literal["raise", "skip"] = "raise"
    #: Per-objective options, keyed by objective name (filled from the sub-dicts).
    options: dict = field(default_factory=dict)

    def selected_options(self) -> dict:
        return dict(self.options.get(self.name, {}))


@dataclass
class ExperimentConfig:
    """A whole experiment: the five sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    training: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        obj = dataclasses.asdict(self.objective)
        opts = obj.pop("options")
        obj.update(opts)
        ev = dataclasses.asdict(self.eval)
        ev = {k: list(v) if isinstance(v, tuple) else v for k, v in ev.items()}
        return {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "objective": obj,
            "eval": ev,
            "training": dict(self.training),
        }

    def save(self, path: str | Path) -> Path:
        """Write the resolved config as YAML (reloadable with :func:`load_config`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    def training_arguments(self):
        """``transformers.TrainingArguments`` built from the ``training:`` section."""
        from transformers import TrainingArguments

        try:
            return TrainingArguments(**self.training)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"training: {e}") from None


# --------------------------------------------------------------------------- typing helpers
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _yaml_value(text: str, key: str) -> Any:
    """``text`` parsed as a YAML value (a list or mapping given on the command line)."""
    try:
        return safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: malformed value {text!r} ({getattr(e, 'problem', None) or 'not valid YAML'}); "
                          "write a list as [a, b] and a mapping as {k: v}, quoted for the shell") from None


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is None:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        # try the member that matches exactly first, then conversions
        members = [a for a in args if a is not type(None)]
        for a in sorted(members, key=lambda a: 0 if isinstance(a, type) and isinstance(value, a) else 1):
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        malformed = [e for e in errors if ": malformed value" in e]
        if malformed:  # the value was meant as a list/mapping: say what is wrong with it
            raise ConfigError(malformed[0])
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: must be one of {', '.join(map(repr, args))}, got {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            parsed = _yaml_value(value, key) if value.strip().startswith("[") else [v.strip() for v in value.split(",")]
            value = parsed
        if not isinstance(value, (list, tuple)):
            value = [value]
        elem = args[0] if args else Any
        items = [coerce(v, elem, key) for v in value]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = _yaml_value(value, key)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, bool) and (tp is str or (isinstance(tp, type) and issubclass(tp, enum.Enum))):
        # YAML 1.1 reads a bare `no`/`yes` as a boolean; string options such as
        # eval_strategy: no mean the word.
        value = "yes" if value else "no"
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        valid = [m.value for m in tp]
        v = value.value if isinstance(value, enum.Enum) else value
        if v in valid:
            return v
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, valid))}, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    return value


def _dataclass_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


_TRAINING_TYPES: dict[str, Any] | None = None


def training_argument_types() -> dict[str, Any]:
    """Field name → type of ``transformers.TrainingArguments`` (cached)."""
    global _TRAINING_TYPES
    if _TRAINING_TYPES is None:
        from transformers import TrainingArguments

        try:
            hints = typing.get_type_hints(TrainingArguments)
        except Exception:  # noqa: BLE001  # pragma: no cover - exotic annotations
            hints = {}
        _TRAINING_TYPES = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}
    return _TRAINING_TYPES


def _suggest(key: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(choices), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


# --------------------------------------------------------------------------- building
def _objective_names() -> set[str]:
    return set(available())


def _build_section(cls, raw: dict, section: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping of keys, got {raw!r}")
    types_ = _dataclass_types(cls)
    unknown = [k for k in raw if k not in types_]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"unknown key '{section}.{k}'{_suggest(k, types_)}; valid keys: {', '.join(types_)}")
    return cls(**{k: coerce(v, types_[k], f"{section}.{k}") for k, v in raw.items()})


def _build_objective(raw: dict | None) -> ObjectiveConfig:
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"objective: expected a mapping of keys (e.g. {{name: emo}}), got {raw!r}; "
                          f"on the command line: --objective emo")
    raw = dict(raw or {})
    types_ = _dataclass_types(ObjectiveConfig)
    options: dict[str, dict] = {}
    for name in list(raw):
        if name in _objective_names():
            sub = raw.pop(name) or {}
            if not isinstance(sub, dict):
                raise ConfigError(f"objective.{name}: expected a mapping of options, got {sub!r}")
            options[name] = sub
    if "options" in raw:
        raise ConfigError("objective.options: put an objective's options under its name, e.g. objective.emo.mode")
    unknown = [k for k in raw if k not in types_]
    if unknown:
        k = unknown[0]
        valid = [t for t in types_ if t != "options"] + sorted(_objective_names())
        raise ConfigError(f"unknown key 'objective.{k}'{_suggest(k, valid)}; valid keys: {', '.join(valid)}")
    cfg = ObjectiveConfig(**{k: coerce(v, types_[k], f"objective.{k}") for k, v in raw.items()})
    cfg.name = str(cfg.name).lower()
    # Validate option names and types of every objective mentioned (implemented ones).
    for name, sub in options.items():
        if name not in available():
            options[name] = sub
            continue
        params = objective_options(name)
        hints = typing.get_type_hints(objective_class(name).__init__)
        for k, v in list(sub.items()):
            if k not in params:
                raise ConfigError(
                    f"unknown key 'objective.{name}.{k}'{_suggest(k, params)}; "
                    f"options of {name}: {', '.join(params) or '(none)'}"
                )
            sub[k] = coerce(v, hints.get(k, Any), f"objective.{name}.{k}")
    cfg.options = options
    return cfg


def build_config(raw: dict) -> ExperimentConfig:
    """Validate a raw dict (from YAML) into an :class:`ExperimentConfig`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping with sections {', '.join(SECTIONS)}; got {type(raw).__name__}")
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"unknown section '{k}'{_suggest(k, SECTIONS)}; valid sections: {', '.join(SECTIONS)}")
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise ConfigError(f"training: expected a mapping of TrainingArguments keys, got {training!r}")
    ttypes = training_argument_types()
    for k, v in list(training.items()):
        if k not in ttypes:
            raise ConfigError(f"unknown key 'training.{k}'{_suggest(k, ttypes)} (not a transformers.TrainingArguments field)")
        training[k] = coerce(v, ttypes[k], f"training.{k}")
    ev = raw.get("eval")
    if ev is not None and not isinstance(ev, dict):
        raise ConfigError(f"eval: expected a mapping of keys (e.g. {{generation: false}}), got {ev!r}")
    ev = dict(ev or {})
    cfg = ExperimentConfig(
        model=_build_section(ModelConfig, raw.get("model"), "model"),
        data=_build_section(DataConfig, raw.get("data"), "data"),
        objective=_build_objective(raw.get("objective")),
        eval=_build_section(EvalConfig, ev, "eval"),
        training=dict(training),
    )
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    """Range checks and cross-section checks; raises ConfigError naming the key."""
    try:
        objective_class(cfg.objective.name)
    except ObjectiveError as e:
        raise ConfigError(f"objective.name: {e}") from None
    t = cfg.training
    for key in ("learning_rate",):
        if key in t and not (t[key] > 0 and math.isfinite(t[key])):
            raise ConfigError(f"training.{key}: must be a positive number, got {t[key]}")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if key in t and t[key] < 1:
            raise ConfigError(f"training.{key}: must be at least 1, got {t[key]}")
    if "weight_decay" in t and t["weight_decay"] < 0:
        raise ConfigError(f"training.weight_decay: must be >= 0, got {t['weight_decay']}")
    if "num_train_epochs" in t and t["num_train_epochs"] <= 0 and t.get("max_steps", -1) <= 0:
        raise ConfigError("training.num_train_epochs: must be > 0 (or set training.max_steps)")
    d = cfg.data
    if d.block_size < 2:
        raise ConfigError(f"data.block_size: must be at least 2 tokens, got {d.block_size}")
    if not 0 <= d.validation_split_percentage < 100:
        raise ConfigError(f"data.validation_split_percentage: must be in [0, 100), got {d.validation_split_percentage}")
    if d.calibration_sentences is not None and d.calibration_sentences < 1:
        raise ConfigError(f"data.calibration_sentences: must be positive, got {d.calibration_sentences}")
    if d.dataset is None and not d.train_files:
        raise ConfigError("data: set data.dataset (a hub name or builtin:quickstart) or data.train_files (local files)")
    m = cfg.model
    if m.name_or_path is None and m.config is None:
        raise ConfigError("model: set model.name_or_path (hub id or local path) or model.config (to build a fresh model)")
    if m.config is not None and "model_type" not in m.config:
        raise ConfigError("model.config: needs a model_type, e.g. {model_type: gpt2, n_layer: 2, ...}")
    if m.config is not None:
        _check_model_config(m.config)
    if m.name_or_path is None and m.tokenizer is None and m.train_tokenizer_vocab_size is None:
        raise ConfigError("model: a fresh model needs model.tokenizer or model.train_tokenizer_vocab_size")
    if cfg.objective.chunk_size < 1:
        raise ConfigError(f"objective.chunk_size: must be positive, got {cfg.objective.chunk_size}")
    validate_eval(cfg.eval)
    # Objective options: let the objective's own constructor check ranges (e.g. MixCE eta in [0, 1]),
    # for every objective given options, not only the selected one (a typo'd value must not wait
    # until someone switches objectives).
    for name in [cfg.objective.name, *(n for n in cfg.objective.options if n != cfg.objective.name)]:
        if name not in available():
            continue
        try:
            objective_class(name)(**cfg.objective.options.get(name, {}))
        except (ObjectiveError, ValueError, TypeError) as e:
            raise ConfigError(f"objective.{name}: {e}") from None


def _check_model_config(conf: dict) -> None:
    """``model.config``: a ``model_type`` transformers knows, and only keys its config class has
    (transformers keeps a misspelt key such as ``n_layers`` as an unused attribute, silently).
    Checked with the config, before any data is read (transformers' own model_type error lists
    every type, after the data pass)."""
    from transformers import CONFIG_MAPPING

    model_type = conf["model_type"]
    names = list(CONFIG_MAPPING.keys())
    if not isinstance(model_type, str) or model_type not in names:
        close = _suggest(str(model_type), names)
        raise ConfigError(f"model.config.model_type: unknown model type {model_type!r}{close}; use one transformers "
                          f"knows, e.g. gpt2, llama, qwen2 (transformers.CONFIG_MAPPING lists {len(names)})")
    try:
        default = CONFIG_MAPPING[model_type]()
    except Exception:  # noqa: BLE001 - a config class that needs arguments: not checked here
        return
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    for k, v in conf.items():
        if k == "model_type" or k in known or hasattr(default, k):
            continue
        try:  # a key the config class consumes (e.g. a legacy name it converts) is fine
            kept_as_is = hasattr(type(default)(**{k: v}), k)
        except Exception:  # noqa: BLE001, S112 - a value the class rejects: transformers will say so
            continue
        if kept_as_is:  # transformers keeps an unknown key as a plain attribute that nothing reads
            raise ConfigError(f"unknown key 'model.config.{k}'{_suggest(k, known)}: {type(default).__name__} has no "
                              f"such setting (transformers would ignore it)")


def validate_eval(e: EvalConfig) -> None:
    """Range checks of the ``eval:`` keys (training config and ``scripts/evaluate.py``)."""
    checks = [
        (e.num_prompts >= 0, f"eval.num_prompts: must be >= 0 (0 = no generation), got {e.num_prompts}"),
        (e.max_new_tokens >= 1, f"eval.max_new_tokens: must be at least 1, got {e.max_new_tokens}"),
        (e.batch_size >= 1, f"eval.batch_size: must be at least 1, got {e.batch_size}"),
        (0 < e.top_p <= 1, f"eval.top_p: must be in (0, 1], got {e.top_p}"),
        (e.temperature > 0, f"eval.temperature: must be > 0, got {e.temperature}"),
        (e.top_k >= 0, f"eval.top_k: must be >= 0 (0 = no top-k), got {e.top_k}"),
        (len(e.seeds) > 0, "eval.seeds: give at least one sampling seed"),
        (e.prompt_words >= 0 and e.continuation_words >= 1,
         (f"eval.prompt_words / eval.continuation_words: must be >= 0 / >= 1, got {e.prompt_words} / "
          f"{e.continuation_words}")),
        (e.mauve_pooling in ("auto", "last", "mean"),
         f"eval.mauve_pooling: must be one of 'auto', 'last', 'mean', got {e.mauve_pooling!r}"),
        (e.mauve_scaling_factor > 0, f"eval.mauve_scaling_factor: must be > 0, got {e.mauve_scaling_factor}"),
    ]
    for key in ("mauve_max_text_length", "mauve_kmeans_num_redo", "mauve_kmeans_max_iter", "featurizer_batch_size"):
        checks.append((getattr(e, key) >= 1, f"eval.{key}: must be at least 1, got {getattr(e, key)}"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _validate_decodings(e)


def _validate_decodings(e: EvalConfig) -> None:
    from .evaluation.config import _NAME_OK, DECODING_KEYS

    for i, d in enumerate(e.decodings):
        where = f"eval.decodings[{i}]"
        if not isinstance(d, dict) or not d:
            raise ConfigError(f"{where}: expected a mapping such as {{top_p: 0.95}}, got {d!r}")
        unknown = [k for k in d if k not in DECODING_KEYS]
        if unknown:
            raise ConfigError(f"{where}: unknown key '{unknown[0]}'{_suggest(str(unknown[0]), DECODING_KEYS)}; "
                              f"valid keys: {', '.join(DECODING_KEYS)}")
        for key, tp in (("temperature", float), ("top_k", int), ("top_p", float)):
            if key in d:
                d[key] = coerce(d[key], tp, f"{where}.{key}")
    settings = e.decoding_settings()
    for i, s in enumerate(settings[1:]):
        where = f"eval.decodings[{i}]"
        if not s.name:
            raise ConfigError(f"{where}: {e.decodings[i]!r} is the main decoding setting (eval.temperature/top_k/"
                              "top_p) again; change a value or remove it")
        if not _NAME_OK.match(s.name):
            raise ConfigError(f"{where}.name: {s.name!r} must be letters, digits, '.', '_' or '-' (it prefixes "
                              "the logged keys)")
        for ok, message in ((0 < s.top_p <= 1, f"{where}.top_p: must be in (0, 1], got {s.top_p}"),
                            (s.temperature > 0, f"{where}.temperature: must be > 0, got {s.temperature}"),
                            (s.top_k >= 0, f"{where}.top_k: must be >= 0 (0 = no top-k), got {s.top_k}")):
            if not ok:
                raise ConfigError(message)
    names = [s.name for s in settings[1:]]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"eval.decodings: two settings are named {dup!r}; give them different 'name's")


def build_section(cls, raw: dict, section: str):
    """A config section (``ModelConfig``, ``DataConfig``, ``EvalConfig``) from a raw dict: unknown
    keys and wrong types raise :class:`ConfigError` naming the key."""
    return _build_section(cls, raw, section)


def cli_value(path: list[str], text: str) -> Any:
    """A command-line value as ``load_config`` reads it: YAML, but kept a string where the key at
    ``path`` (e.g. ``["eval", "mauve_featurizer"]``) is a string."""
    value = _parse_cli_value(text)
    # keep strings that YAML would turn into numbers where a string is expected (e.g. paths)
    return _maybe_keep_string(path, text, value) if isinstance(value, (int, float)) else value


def build_objective(ocfg: ObjectiveConfig):
    """Instantiate the selected objective from an :class:`ObjectiveConfig`."""
    from .objectives import get_objective

    return get_objective(ocfg.name, **ocfg.selected_options())


# --------------------------------------------------------------------------- YAML + CLI
class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last
    one silently: a config with two ``learning_rate:`` lines would train with whichever comes last)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: let the SafeLoader say so
            break
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first at line {first.line + 1}): remove one of them",
                key_node.start_mark)
        seen[key] = key_node.start_mark
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` that also refuses duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config safely; clear errors for missing or malformed files."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config: {path} is a directory; give a YAML file, e.g. configs/quickstart.yaml")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(
            f"the config must be a mapping with sections {', '.join(SECTIONS)}; {path} holds a {type(raw).__name__}"
        )
    return raw or {}


def parse_overrides(argv: list[str]) -> list[tuple[str, str | None]]:
    """``['--a.b', '1', 'c=2', '--flag']`` → ``[('a.b','1'), ('c','2'), ('flag', None)]``."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            key = tok[2:]
            if "=" in key:
                key, val = key.split("=", 1)
                out.append((key, val))
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out.append((key, argv[i + 1]))
                i += 1
            else:
                out.append((key, None))  # bare flag = true
        elif "=" in tok:
            key, val = tok.split("=", 1)
            out.append((key, val))
        else:
            raise ConfigError(f"unexpected argument '{tok}': use --key value or key=value")
        i += 1
    return out


def _set_path(raw: dict, path: list[str], value: Any) -> None:
    node = raw
    for p in path[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set '{'.'.join(path)}': '{p}' is not a section")
        node = nxt
    node[path[-1]] = value


def _resolve_key(key: str) -> list[str]:
    """Map a command-line key to its path in the raw config dict."""
    key = key.replace("-", "_") if key.count(".") == 0 and key not in _objective_names() else key
    parts = key.split(".")
    if parts == ["objective"]:
        return ["objective", "name"]
    if parts[0] in SECTIONS:
        return parts
    if parts[0] in _objective_names():
        return ["objective", *parts]
    if len(parts) > 1:
        raise ConfigError(f"unknown key '{key}': '{parts[0]}' is not a section ({', '.join(SECTIONS)}) or an objective")
    hits = []
    for section, cls in (("model", ModelConfig), ("data", DataConfig), ("objective", ObjectiveConfig), ("eval", EvalConfig)):
        if key in _dataclass_types(cls) and key != "options":
            hits.append([section, key])
    if key in training_argument_types():
        hits.append(["training", key])
    if not hits:
        owners = [n for n in sorted(available()) if key in objective_options(n)]
        if owners:
            raise ConfigError(f"unknown key '--{key}': an objective option, give its objective: "
                              f"{' or '.join(f'--{n}.{key}' for n in owners)}")
        everything = set(training_argument_types())
        for cls in (ModelConfig, DataConfig, ObjectiveConfig, EvalConfig):
            everything |= set(_dataclass_types(cls))
        raise ConfigError(f"unknown key '--{key}'{_suggest(key, everything)}")
    if len(hits) > 1:
        raise ConfigError(f"ambiguous key '--{key}': say which, e.g. {' or '.join('--' + '.'.join(h) for h in hits)}")
    return hits[0]


def _parse_cli_value(val: str) -> Any:
    try:
        return safe_load(val)
    except yaml.YAMLError:
        return val


def _key_type(path: list[str]) -> Any:
    """The declared type of the config key at ``path`` (``Any`` when unknown)."""
    section, leaf = path[0], path[-1]
    if section == "objective" and len(path) == 3 and path[1] in available():
        return typing.get_type_hints(objective_class(path[1]).__init__).get(leaf, Any)
    cls = {"model": ModelConfig, "data": DataConfig, "objective": ObjectiveConfig, "eval": EvalConfig}.get(section)
    types_ = _dataclass_types(cls) if cls else training_argument_types() if section == "training" else {}
    return types_.get(leaf, Any) if len(path) == 2 else Any


def apply_overrides(raw: dict, overrides: list[tuple[str, str | None]]) -> dict:
    """Apply command-line overrides to a raw config dict (before validation)."""
    raw = dict(raw)
    for key, val in overrides:
        path = _resolve_key(key)
        tp = _key_type(path)
        if val is None and tp is not Any and tp is not bool and bool not in typing.get_args(tp):
            raise ConfigError(f"--{key} needs a value, e.g. --{key} {'emo' if path == ['objective', 'name'] else 'VALUE'}")
        _set_path(raw, path, True if val is None else cli_value(path, val))  # a bare flag = true
    return raw


def _maybe_keep_string(path: list[str], text: str, value: Any) -> Any:
    section, leaf = path[0], path[-1]
    types_ = {
        "model": _dataclass_types(ModelConfig),
        "data": _dataclass_types(DataConfig),
        "eval": _dataclass_types(EvalConfig),
        "training": training_argument_types(),
    }.get(section, {})
    tp = types_.get(leaf)
    if tp is str or str in typing.get_args(tp):
        return text
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config (optional) and apply command-line style overrides."""
    raw = load_yaml(path) if path else {}
    parsed = parse_overrides(overrides or [])
    raw = apply_overrides(raw, parsed)
    cfg = build_config(raw)
    for key, _ in parsed:
        where = _resolve_key(key)
        if len(where) == 3 and where[0] == "objective" and where[1] in _objective_names() and where[1] != cfg.objective.name:
            logger.warning("--%s has no effect: the objective is '%s' (add --objective %s to train with %s)",
                           key, cfg.objective.name, where[1], where[1])
    return cfg
