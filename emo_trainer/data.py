"""Data: raw text → tokenized blocks, plus the raw eval documents for generation metrics.

Flow: :func:`load_raw_splits` (hub dataset, local files, or the embedded quickstart corpus;
a validation split is carved from train when there is none) → optional
:func:`calibration_set` (sentences sampled with a fixed seed) → :func:`tokenize_splits`
(``datasets.map``, cached, multiprocess for large data; packing into ``block_size`` blocks
or one truncated document per example) → :class:`CausalLMCollator` (padding, labels).
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import DataConfig
from .errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_FORMATS = {".txt": "text", ".text": "text", ".raw": "text", ".tokens": "text", ".jsonl": "json", ".json": "json",
            ".parquet": "parquet", ".csv": "csv"}




# --------------------------------------------------------------------------- raw splits
def _file_format(files: list[str], key: str) -> str:
    fmts = set()
    for f in files:
        p = Path(f)
        if not p.exists():
            raise DataError(f"data.{key}: file not found: {f}")
        if p.is_dir():
            raise DataError(f"data.{key}: {f} is a directory; list its files instead, e.g. [{p / 'train.txt'}]")
        if p.stat().st_size == 0:
            raise DataError(f"data.{key}: {f} is empty (0 bytes); give a file with text, or remove it from data.{key}")
        ext = p.suffix.lower()
        if ext not in _FORMATS:
            raise DataError(f"data.{key}: unsupported file type '{ext}' ({f}); use .txt, .jsonl, .json, .parquet or .csv")
        fmts.add(_FORMATS[ext])
        if _FORMATS[ext] in ("text", "json", "csv"):  # parquet stores its own (valid) strings
            _check_utf8(p, key)
    if len(fmts) > 1:
        raise DataError(f"data.{key}: mixed file types {sorted(fmts)}; use one format per split")
    return fmts.pop()


def _check_utf8(path: Path, key: str) -> None:
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"data.{key}: {path} is not valid UTF-8 (line {lineno}, byte {e.start}); re-encode it, "
                    f"e.g. iconv -f latin1 -t utf-8"
                ) from None


def load_raw_splits(cfg: DataConfig, seed: int = 42):
    """``datasets.DatasetDict`` with ``train`` and ``validation`` splits of raw text.

    Rows keep only ``cfg.text_column``; rows with fewer than ``cfg.min_chars`` characters are dropped.
    """
    import datasets

    if cfg.dataset and cfg.dataset.startswith("builtin:"):
        name = cfg.dataset.split(":", 1)[1]
        if name != "quickstart":
            raise DataError(f"data.dataset: unknown builtin corpus '{name}'; the builtin corpus is builtin:quickstart")
        from .quickstart_corpus import quickstart_splits

        splits = quickstart_splits(seed=0)
        raw = datasets.DatasetDict({k: datasets.Dataset.from_dict({cfg.text_column: v}) for k, v in splits.items()})
    elif cfg.train_files:
        data_files = {"train": list(cfg.train_files)}
        fmt = _file_format(data_files["train"], "train_files")
        if cfg.validation_files:
            data_files["validation"] = list(cfg.validation_files)
            if _file_format(data_files["validation"], "validation_files") != fmt:
                raise DataError("data.validation_files: must have the same format as data.train_files")
        _warn_shared_files(data_files)
        kwargs = {"keep_linebreaks": False} if fmt == "text" else {}
        # datasets logs a malformed JSON line as an ERROR with its traceback before raising: the
        # error line below says it (path, line number) instead
        json_log = logging.getLogger("datasets.packaged_modules.json.json")
        level = json_log.level
        json_log.setLevel(logging.CRITICAL)
        try:
            raw = datasets.load_dataset(fmt, data_files=data_files, **kwargs)
        except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable files
            for split, key in (("train", "train_files"), ("validation", "validation_files")):
                for f in data_files.get(split, []):
                    problem = _file_problem(f, fmt)
                    if problem:
                        raise DataError(f"data.{key}: {problem}") from None
            raise DataError(f"data.train_files: could not read the files ({type(e).__name__}: {_short(e)})") from None
        finally:
            json_log.setLevel(level)
    else:
        try:
            raw = datasets.load_dataset(cfg.dataset, cfg.dataset_config)
        except Exception as e:  # noqa: BLE001 - hub, network and builder errors alike: one line for the user
            raise DataError(
                f"data.dataset: could not load '{cfg.dataset}'"
                + (f" ({cfg.dataset_config})" if cfg.dataset_config else "")
                + f": {_short(e)}. Offline? Use local files with data.train_files / data.validation_files."
            ) from None
    if "train" not in raw:
        raise DataError(f"data: the dataset has no 'train' split (splits: {', '.join(raw)})")
    for split in list(raw):
        if cfg.text_column not in raw[split].column_names:
            raise DataError(
                f"data.text_column: column '{cfg.text_column}' not in the {split} split "
                f"(columns: {', '.join(raw[split].column_names)})"
            )
        raw[split] = raw[split].select_columns([cfg.text_column])
    for split in ("train", "validation"):
        if split in raw:
            _check_text_values(raw[split], cfg, split)
    if "validation" not in raw:
        if cfg.validation_split_percentage <= 0:
            raise DataError("data: no validation split; set data.validation_files or data.validation_split_percentage > 0")
        n = len(raw["train"])
        n_valid = math.ceil(n * cfg.validation_split_percentage / 100.0)
        if n - n_valid < 1:
            raise DataError(
                f"data: the training data has {n} text(s), too few to hold out "
                f"{cfg.validation_split_percentage}% for validation; give data.validation_files, or more text"
            )
        parts = raw["train"].train_test_split(test_size=cfg.validation_split_percentage / 100.0, seed=seed)
        raw = datasets.DatasetDict({"train": parts["train"], "validation": parts["test"]})
    else:
        raw = datasets.DatasetDict({"train": raw["train"], "validation": raw["validation"]})
    col, min_chars = cfg.text_column, max(cfg.min_chars, 1)
    if cfg.detokenize == "wikitext":
        raw = raw.map(lambda b: {col: [detokenize_wikitext(t) if isinstance(t, str) else t for t in b[col]]},
                      batched=True, desc="detokenize")
    raw = raw.filter(lambda b: [isinstance(t, str) and len(t.strip()) >= min_chars for t in b[col]], batched=True)
    if cfg.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(cfg.max_train_samples, len(raw["train"]))))
    if cfg.max_eval_samples is not None:
        raw["validation"] = raw["validation"].select(range(min(cfg.max_eval_samples, len(raw["validation"]))))
    for split in raw:
        if len(raw[split]) == 0:
            raise DataError(f"data: the {split} split has no usable text in column '{cfg.text_column}'")
    return raw


def _warn_shared_files(data_files: dict[str, list[str]]) -> None:
    """A file given for both training and validation: the eval loss then measures memorisation."""
    train = {Path(f).resolve(): f for f in data_files["train"]}
    shared = [f for f in data_files.get("validation", []) if Path(f).resolve() in train]
    if shared:
        logger.warning("data.validation_files: %s is also in data.train_files: the validation loss and perplexity "
                       "then measure memorised text, not held-out text; give a separate validation file, or leave "
                       "data.validation_files empty to hold out data.validation_split_percentage of the training text",
                       ", ".join(shared))


def _file_problem(path: str, fmt: str) -> str | None:
    """What makes one data file unreadable (called when ``datasets`` failed): a malformed JSON line,
    a CSV with a header only...; None when nothing is found."""
    import json

    p = Path(path)
    if fmt == "json":
        text = p.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):  # one JSON document (a list of records)
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                return f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix the file"
            return None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return (f"{path} line {lineno} is not valid JSON ({e.msg}, column {e.colno}); fix or remove that line "
                        f"(JSONL: one JSON object per line)")
            if not isinstance(row, dict):
                return f"{path} line {lineno} is a JSON {type(row).__name__}, not an object; JSONL needs one {{\"text\": ...}} per line"
        return None
    if fmt == "csv":
        lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(lines) <= 1:
            return f"{path} has a header line but no rows; add rows, or remove the file"
    return None


def _check_text_values(ds, cfg: DataConfig, split: str) -> None:
    """Every row's text must be a string.  Other values (a number, a list: a column mixing types, as JSON
    allows) stop the run naming the first such row; null rows are skipped with a warning giving their
    count (like empty strings, they hold no text).  Nothing is dropped without a word."""
    import datasets

    col = cfg.text_column
    feature = ds.features[col]
    files = list((cfg.train_files if split == "train" else cfg.validation_files) or [])
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        nulls, bad, first = ds.data.column(col).null_count, 0, None
    else:
        nulls, bad, first = 0, 0, None
        for i, v in enumerate(ds[col]):
            if v is None:
                nulls += 1
            elif not isinstance(v, str):
                bad += 1
                if first is None:
                    first = (i, v)
    if bad:
        i, v = first
        shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
        raise DataError(
            f"data: {bad} of {len(ds)} rows of the {split} split hold no text string in column '{col}' (first: "
            f"{_row_location(files, i, split)}, a {type(v).__name__}: {shown}); make that column text in every row "
            f"(e.g. quote numbers, join lists), or remove those rows"
        )
    if nulls:
        logger.warning("data: %d of %d rows of the %s split have null in column '%s' (%s); they are skipped",
                       nulls, len(ds), split, col, ", ".join(files) or cfg.dataset)


def _row_location(files: list[str], index: int, split: str) -> str:
    """Where row ``index`` (0-based, files concatenated in order) of a split comes from: the file and,
    for JSONL, the line."""
    if files and all(Path(f).suffix.lower() == ".jsonl" for f in files):
        n = -1
        for f in files:
            with open(f, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        n += 1
                        if n == index:
                            return f"{f} line {lineno}"
    if len(files) == 1:
        return f"row {index + 1} of {files[0]}"
    return f"row {index + 1} of the {split} split"


def _short(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


# --------------------------------------------------------------------------- calibration
_HEADING = re.compile(r"^\s*=+.*=+\s*$")


def detokenize_wikitext(text: str) -> str:
    """Undo WikiText's tokenisation spaces (`` @-@ ``, `` , ``, `` 's``...) for the ``.tokens`` files."""
    t = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    t = re.sub(r" ([.,;:!?%)\]}])", r"\1", t)
    t = re.sub(r"([(\[{$]) ", r"\1", t)
    t = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", t)
    t = re.sub(r'" (.*?) "', r'"\1"', t)
    return re.sub(r"\s+", " ", t).strip()


def split_sentences(documents: list[str], min_words: int = 5, drop_pattern: str | None = "<unk>") -> list[str]:
    """Documents → sentences with pysbd (rule-based, no download); headings and short lines dropped."""
    import pysbd

    seg = pysbd.Segmenter(language="en", clean=False)
    out = []
    for doc in documents:
        if not doc or _HEADING.match(doc):
            continue
        for s in seg.segment(doc):
            s = s.strip()
            if len(s.split()) < min_words or _HEADING.match(s):
                continue
            if drop_pattern and drop_pattern in s:
                continue
            out.append(s)
    return out


def calibration_set(documents: list[str], n: int, seed: int = 42, min_words: int = 5) -> list[str]:
    """``n`` sentences sampled without replacement with a fixed seed (all of them if fewer exist)."""
    sentences = split_sentences(documents, min_words=min_words)
    if not sentences:
        raise DataError("data.calibration_sentences: no usable sentences in the training documents")
    rng = random.Random(seed)
    if len(sentences) > n:
        sentences = rng.sample(sentences, n)
    else:
        logger.warning("calibration set: only %d sentences available (asked for %d)", len(sentences), n)
        rng.shuffle(sentences)
    return sentences


# --------------------------------------------------------------------------- tokenisation
def _num_proc(cfg: DataConfig, n_rows: int) -> int | None:
    if cfg.num_proc is not None:
        return cfg.num_proc if cfg.num_proc > 1 else None
    if n_rows < 50_000:
        return None
    return min(8, os.cpu_count() or 1)


def tokenize_splits(raw, tokenizer, cfg: DataConfig):
    """Tokenize and pack (or truncate) every split.  Returns a DatasetDict with ``input_ids``.

    Packing concatenates documents (with EOS between them when ``add_eos``) and cuts blocks of
    exactly ``block_size`` tokens, dropping the remainder, as the EMO/run_clm scripts do.
    """
    col, block, eos = cfg.text_column, cfg.block_size, tokenizer.eos_token_id
    add_eos = cfg.add_eos

    def tok(batch):
        ids = tokenizer(batch[col], add_special_tokens=False)["input_ids"]
        if add_eos:
            ids = [x + [eos] for x in ids]
        return {"input_ids": ids}

    def pack(batch):
        flat = [t for ids in batch["input_ids"] for t in ids]
        n = (len(flat) // block) * block
        return {"input_ids": [flat[i : i + block] for i in range(0, n, block)]}

    def truncate(batch):
        return {"input_ids": [ids[:block] for ids in batch["input_ids"] if len(ids) > 1]}

    out = {}
    for split, ds in raw.items():
        nproc = _num_proc(cfg, len(ds))
        tokd = ds.map(tok, batched=True, remove_columns=ds.column_names, num_proc=nproc, desc=f"tokenize {split}")
        if cfg.packing:
            tokd = tokd.map(pack, batched=True, batch_size=1000, num_proc=nproc, desc=f"pack {split}")
        else:
            tokd = tokd.map(truncate, batched=True, num_proc=nproc, desc=f"truncate {split}")
        if len(tokd) == 0:
            total = sum(len(x) for x in ds.map(tok, batched=True, remove_columns=ds.column_names)["input_ids"])
            raise DataError(
                f"data: the {split} split has {total} tokens, fewer than one block of data.block_size={block}; "
                f"lower data.block_size or add text"
            )
        out[split] = tokd
    import datasets

    return datasets.DatasetDict(out)


@dataclass
class CausalLMCollator:
    """Pads ``input_ids`` to the longest example and builds ``labels``.

    Labels are the input ids where the attention mask is 1 and −100 on padding, so an EOS
    token that is also the pad token is still trained on when it is real text (MixCE setting).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        longest = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for i, f in enumerate(features):
            x = torch.as_tensor(f["input_ids"], dtype=torch.long)
            ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
