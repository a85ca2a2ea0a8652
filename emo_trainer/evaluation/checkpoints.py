"""Evaluating saved checkpoints: the questions every evaluation asks, answered once.

* :func:`load_checkpoint` — model and tokenizer of a checkpoint directory, ready for evaluation;
* :func:`backspace_id` / :func:`is_sequencematch_checkpoint` — is it a SequenceMatch model
  (one with the ``<bkspc>`` action), and which id is the action;
* :func:`document_perplexity` — token-weighted perplexity over a list of documents, tokenized and
  packed into blocks as in training, over the original vocabulary for a SequenceMatch model;
* :func:`read_documents` — documents from local text/jsonl/parquet/csv files.

Used by ``scripts/evaluate.py`` (:mod:`emo_trainer.evaluation.evaluate_cli`) and by the
calibration study; usable directly::

    model, tok = load_checkpoint("runs/emo/final")
    ppl = document_perplexity(model, tok, documents, block_size=512)["perplexity"]
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, DataError

#: file suffix -> ``datasets`` builder of the readable document files
FILE_FORMATS = {".txt": "text", ".text": "text", ".raw": "text", ".tokens": "text", ".jsonl": "json",
                ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


# --------------------------------------------------------------------------- SequenceMatch or not


def backspace_id(checkpoint: Any, tokenizer: Any = None) -> int | None:
    """The ``<bkspc>`` action id of a SequenceMatch checkpoint, or None for any other model.

    ``checkpoint`` is a model directory (read from its ``config.json``, nothing loaded) or a loaded
    model.  The answer is the id SequenceMatch records in ``config.backspace_token_id`` when it adds
    the action; for a model whose config lacks it (e.g. merged by an older tool), the
    ``<bkspc>`` token of ``tokenizer`` (when given) answers instead.
    """
    from ..objectives.sequencematch.backspace import backspace_token_id

    tid = None
    if isinstance(checkpoint, (str, Path)):
        config = Path(checkpoint) / "config.json"
        if config.is_file():
            try:
                tid = json.loads(config.read_text(encoding="utf-8")).get("backspace_token_id")
            except (ValueError, UnicodeDecodeError, AttributeError):
                tid = None
    elif checkpoint is not None:
        tid = backspace_token_id(model=checkpoint)
    if tid is None and tokenizer is not None:
        tid = backspace_token_id(tokenizer)
    return None if tid is None else int(tid)


def is_sequencematch_checkpoint(checkpoint: Any, tokenizer: Any = None) -> bool:
    """True if ``checkpoint`` (a model directory or a loaded model) is a SequenceMatch model: it has
    the ``<bkspc>`` action (see :func:`backspace_id`)."""
    return backspace_id(checkpoint, tokenizer) is not None


# --------------------------------------------------------------------------- loading


def check_checkpoint_dir(path: str | Path) -> None:
    """Raise :class:`CheckpointError` (with the fix) unless ``path`` is a model directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {path}: no such directory; pass a run's final/ or checkpoint-N/ folder")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a directory; pass a run's final/ or checkpoint-N/ folder")
    if not (p / "config.json").is_file():
        if (p / "adapter_config.json").is_file():
            raise CheckpointError(f"checkpoint {path}: a LoRA adapter, not a full model; merge it first: "
                                  f"python scripts/merge_lora.py {path} MERGED_DIR")
        hint = f" (did you mean {p / 'final'}?)" if (p / "final" / "config.json").is_file() else ""
        raise CheckpointError(f"checkpoint {path}: no config.json, not a model directory{hint}; "
                              "pass a run's final/ or checkpoint-N/ folder")


def load_tokenizer_of(path: str | Path, tokenizer: str | Path | None = None):
    """The tokenizer of checkpoint ``path``: ``tokenizer`` if given, else the first usable one of
    ``path``, ``path/tokenizer`` and ``path/../tokenizer`` (a run's trained tokenizer).  A tokenizer
    without a pad token gets EOS as pad."""
    from transformers import AutoTokenizer

    candidates = [str(tokenizer)] if tokenizer else [str(path), str(Path(path) / "tokenizer"),
                                                     str(Path(path).parent / "tokenizer")]
    for c in candidates:
        if Path(c).is_dir() and not any((Path(c) / f).is_file() for f in _TOKENIZER_FILES):
            continue  # transformers would build an empty tokenizer from config.json alone
        try:
            tok = AutoTokenizer.from_pretrained(c)
        except (OSError, ValueError, TypeError):
            continue
        if len(tok) > 1:
            if tok.pad_token is None and tok.eos_token is not None:
                tok.pad_token = tok.eos_token
            return tok
    raise CheckpointError(f"checkpoint {path}: no tokenizer found (tried {', '.join(candidates)}); pass --tokenizer")


def load_checkpoint(path: str | Path, tokenizer: str | Path | None = None, dtype: str = "float32",
                    device: Any = None):
    """``(model, tokenizer)`` of checkpoint directory ``path``, the model in eval mode on ``device``
    (default: this process's device under ``accelerate``, else CUDA if available, else CPU).

    Works for every objective's checkpoints; a SequenceMatch checkpoint keeps its ``<bkspc>`` row
    and ``config.backspace_token_id`` (evaluate it with :func:`document_perplexity`, which masks the
    action, and the backspace-aware sampler).  Raises :class:`CheckpointError` for a path that is
    not a model directory, an unloadable model, or a tokenizer larger than the model's vocabulary.
    """
    import torch
    from transformers import AutoModelForCausalLM

    check_checkpoint_dir(path)
    tok = load_tokenizer_of(path, tokenizer)
    from ..modeling import _load_error, load_error_reason

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    except Exception as e:
        if not _load_error(e):
            raise
        raise CheckpointError(f"checkpoint {path}: cannot load a causal LM ({load_error_reason(e)})") from None
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        raise CheckpointError(f"checkpoint {path}: tokenizer has {len(tok)} tokens but the model's embedding only "
                              f"{rows}; pass the run's tokenizer with --tokenizer")
    if device is None:
        from accelerate import PartialState

        device = PartialState().device
    return model.to(device).eval(), tok


# --------------------------------------------------------------------------- documents and perplexity


def document_format(files: list[str | Path], label: str = "files") -> str:
    """The ``datasets`` builder of document ``files`` (all must exist and share one format of
    :data:`FILE_FORMATS`); :class:`DataError` prefixed with ``label`` otherwise."""
    for f in files:
        if not Path(f).is_file():
            raise DataError(f"{label}: {'is a directory' if Path(f).is_dir() else 'file not found'}: {f}")
    suffixes = {Path(f).suffix.lower() for f in files}
    fmts = {FILE_FORMATS.get(s) for s in suffixes}
    if len(fmts) != 1 or None in fmts:
        raise DataError(f"{label}: use files of one format among {', '.join(sorted(FILE_FORMATS))}; "
                        f"got {', '.join(sorted(s or '(no suffix)' for s in suffixes))}")
    return fmts.pop()


def read_documents(files: list[str | Path], text_column: str = "text", *, label: str = "files",
                   column_label: str = "text_column") -> list[str]:
    """The non-empty documents of local ``files`` (one format: ``.txt``/``.raw``/``.tokens`` one per
    line, ``.jsonl``/``.json``/``.parquet``/``.csv`` from ``text_column``).  :class:`DataError`
    otherwise, naming ``label`` (the files) or ``column_label`` (the column) as the thing to fix."""
    import datasets

    fmt = document_format(files, label)
    kwargs = {"keep_linebreaks": False} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files={"eval": [str(f) for f in files]}, **kwargs)["eval"]
    except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable files
        reason = " ".join(str(e).split())[:200]
        raise DataError(f"{label}: could not read {', '.join(map(str, files))} as {fmt} ({type(e).__name__}: "
                        f"{reason})") from None
    if text_column not in ds.column_names:
        raise DataError(f"{column_label}: no column '{text_column}' in {label} "
                        f"(columns: {', '.join(ds.column_names)}); pass {column_label} NAME")
    return [t for t in ds[text_column] if isinstance(t, str) and t.strip()]


def _without_backspace(model, bk: int):
    """``model`` whose logits have the ``<bkspc>`` column at −inf: the SequenceMatch objective's
    ``eval_logits_transform``, so perplexity is over the original vocabulary exactly as
    ``ObjectiveTrainer`` reports it during training."""
    import torch

    from ..objectives.sequencematch.backspace import strip_backspace_logits

    class WithoutBackspace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, **inputs):
            out = self.model(**inputs)
            out.logits = strip_backspace_logits(out.logits, bk)
            return out

    return WithoutBackspace()


def document_perplexity(model, tokenizer, documents: list[str], *, block_size: int | None = None,
                        data_config=None, batch_size: int = 8, vocab_size: int | None = None,
                        backspace: int | str | None = "auto", max_blocks: int | None = None) -> dict:
    """Token-weighted perplexity of ``model`` over ``documents``: exp(Σ NLL / Σ predicted tokens).

    The documents are tokenized and packed into blocks as in training (``data_config``: a
    :class:`~emo_trainer.config.DataConfig`, for ``block_size``, ``packing``, ``add_eos`` and
    ``text_column``; default ``DataConfig()``; ``block_size`` overrides its block size and is capped at the
    model's ``max_position_embeddings``).  ``max_blocks`` keeps only the first blocks.  Under
    ``accelerate launch`` the blocks are sharded over the processes and the totals summed, so every
    block counts once.

    ``backspace``: ``"auto"`` masks the ``<bkspc>`` column of a SequenceMatch model (see
    :func:`backspace_id`), an int masks that column, None masks nothing.  ``vocab_size`` instead
    restricts the softmax to the first ``vocab_size`` logits (and then nothing is masked).

    Returns ``perplexity``, ``nll`` (per token), ``num_tokens``, ``num_blocks`` and ``block_size``.
    """
    import datasets
    import torch

    from ..config import DataConfig
    from ..data import CausalLMCollator, tokenize_splits
    from .metrics.perplexity import dataloader_nll, perplexity_from_totals
    from .sharding import gather_in_order, process_info

    data_config = data_config if data_config is not None else DataConfig()
    if block_size is not None:
        data_config = dataclasses.replace(data_config, block_size=block_size)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and data_config.block_size > max_pos:
        data_config = dataclasses.replace(data_config, block_size=max_pos)
    raw = datasets.DatasetDict({"eval": datasets.Dataset.from_dict({data_config.text_column: list(documents)})})
    blocks = tokenize_splits(raw, tokenizer, data_config)["eval"]
    if max_blocks is not None:
        blocks = blocks.select(range(min(max_blocks, len(blocks))))
    if len(blocks) == 0:
        raise DataError(f"no block of {data_config.block_size} tokens in the {len(documents)} documents")
    rank, world = process_info()
    mine = blocks.select(range(rank, len(blocks), world))  # disjoint shards: every block counted once
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    loader = torch.utils.data.DataLoader(mine, batch_size=batch_size, collate_fn=CausalLMCollator(pad))
    bk = backspace_id(model) if backspace == "auto" else backspace
    scored = model if bk is None or vocab_size is not None else _without_backspace(model, int(bk))
    nll, tokens = dataloader_nll(scored, loader, vocab_size=vocab_size)
    totals = gather_in_order([(nll, tokens)], world)
    nll, tokens = sum(t[0] for t in totals), sum(t[1] for t in totals)
    return {"perplexity": perplexity_from_totals(nll, tokens), "nll": nll / max(tokens, 1), "num_tokens": tokens,
            "block_size": data_config.block_size, "num_blocks": len(blocks)}
