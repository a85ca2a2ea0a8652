"""Load or build the model and tokenizer of a config (``model:`` section)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, ModelConfig

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, save_dir: str | Path | None = None):
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts``; offline and fast.

    EOS/BOS/UNK is ``<|endoftext|>`` as in GPT-2; padding reuses it (labels of padding are
    masked by the collator via the attention mask, so EOS itself is still trained on).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    fast.pad_token = fast.eos_token
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def load_tokenizer(cfg: ModelConfig, train_texts: Iterable[str] | None = None, save_dir: str | Path | None = None):
    """The tokenizer of ``cfg``: loaded (hub id or local path) or trained on ``train_texts``."""
    from transformers import AutoTokenizer

    if cfg.train_tokenizer_vocab_size:
        if train_texts is None:
            raise ConfigError("model.train_tokenizer_vocab_size needs training text")
        return train_bpe_tokenizer(train_texts, cfg.train_tokenizer_vocab_size, save_dir)
    name = cfg.tokenizer or cfg.name_or_path
    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"  # blame the key the user set
    _check_local(key, name)
    local = Path(name).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        # transformers would build a 1-token tokenizer from config.json alone, silently
        raise ConfigError(f"{key}: {name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); set "
                          f"model.tokenizer to the tokenizer's directory or hub id")
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot load tokenizer '{name}' ({_first_line(e)})") from None
    if len(tok) < 2:
        raise ConfigError(f"{key}: the tokenizer of '{name}' has {len(tok)} token(s); set model.tokenizer to a real one")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.eos_token is None:
        raise ConfigError(f"model.tokenizer: tokenizer '{name}' has no EOS token; use one that defines eos_token")
    return tok


#: Files one of which a tokenizer directory holds.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "vocab.txt")


def _load_error(e: BaseException) -> bool:
    """An error of reading saved weights (not a bug): unreadable/truncated files, a pickle that
    ``torch.load(weights_only=True)`` refuses, a wrong config."""
    import pickle

    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, (OSError, ValueError, KeyError, pickle.UnpicklingError, EOFError)) or "SafetensorError" in names


def load_error_reason(e: BaseException) -> str:
    """A short reason for :func:`_load_error` errors (torch's weights_only message is a paragraph)."""
    import pickle

    if isinstance(e, pickle.UnpicklingError):
        return "UnpicklingError: the pickle holds objects that torch.load(weights_only=True) refuses to run"
    return f"{type(e).__name__}: {_first_line(e)[:300]}"


def _looks_local(name: str) -> bool:
    """A value meant as a local path (not a hub id like ``gpt2`` or ``org/model``)."""
    return name.startswith(("/", "./", "../", "~", "." + os.sep)) or Path(name).expanduser().exists()


def _check_local(key: str, name: str | None) -> None:
    if name and _looks_local(name) and not Path(name).expanduser().exists():
        raise ConfigError(f"{key}: '{name}' does not exist (a local directory was given; check the path, "
                          "or give a Hugging Face hub id such as 'gpt2')")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_model(cfg: ModelConfig, tokenizer: Any):
    """The causal LM of ``cfg``, loaded or built fresh; vocabulary checked against the tokenizer.

    Returns ``(model, is_fresh)`` where ``is_fresh`` says the weights are random (built from
    ``cfg.config``), which e.g. EMO's ``initial`` cost embedding warns about.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    n_tok = len(tokenizer)
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.name_or_path is None:
        conf = dict(cfg.config or {})
        model_type = conf.pop("model_type")
        conf.setdefault("vocab_size", n_tok)
        conf.setdefault("bos_token_id", tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
        conf.setdefault("eos_token_id", tokenizer.eos_token_id)
        conf.setdefault("pad_token_id", tokenizer.pad_token_id)
        try:
            mconf = AutoConfig.for_model(model_type, **conf)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"model.config: {_first_line(e)}") from None
        try:
            model = AutoModelForCausalLM.from_config(mconf, **kwargs)
        except ValueError as e:  # e.g. n_embd not divisible by n_head
            raise ConfigError(f"model.config: {_first_line(e).rstrip('.')}; fix the sizes in model.config") from None
        if cfg.dtype in _DTYPES:
            model = model.to(_DTYPES[cfg.dtype])
        is_fresh = True
    else:
        if cfg.dtype != "auto":
            kwargs["dtype"] = _DTYPES[cfg.dtype]
        _check_local("model.name_or_path", cfg.name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
        except Exception as e:
            if not _load_error(e):
                raise
            raise ConfigError(f"model.name_or_path: cannot load '{cfg.name_or_path}' ({load_error_reason(e)}); the "
                              f"weights files are damaged or not safe to load (pickles are read with "
                              f"weights_only=True): re-download or re-save them") from None
        is_fresh = False
    n_model = model.get_input_embeddings().weight.shape[0]
    if n_tok > n_model:
        raise ConfigError(
            f"tokenizer/model vocabulary mismatch: the tokenizer has {n_tok} tokens but the model's embedding has "
            f"{n_model} rows; use the model's own tokenizer (model.tokenizer) or resize the model's embeddings"
        )
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.lora:
        model = apply_lora(model, cfg.lora)
    return model, is_fresh


def apply_lora(model, lora: dict):
    """Wrap ``model`` with LoRA adapters (``r``, ``alpha``, ``dropout``, ``target_modules``)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("model.lora needs peft: pip install 'emo-trainer[lora]'") from None
    known = {"r", "alpha", "dropout", "target_modules", "bias", "modules_to_save"}
    unknown = set(lora) - known
    if unknown:
        raise ConfigError(f"unknown key 'model.lora.{min(unknown)}'; valid keys: {', '.join(sorted(known))}")
    try:
        conf = LoraConfig(
            r=int(lora.get("r", 32)),
            lora_alpha=int(lora.get("alpha", 16)),
            lora_dropout=float(lora.get("dropout", 0.05)),
            target_modules=lora.get("target_modules"),
            bias=lora.get("bias", "none"),
            modules_to_save=lora.get("modules_to_save"),
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, conf)
    except (ValueError, TypeError) as e:  # r: 0, a target module the model lacks...
        raise ConfigError(f"model.lora: {_first_line(e)}") from None
