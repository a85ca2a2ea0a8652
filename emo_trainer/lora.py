"""LoRA adapters (``scripts/merge_lora.py``): merge an adapter into its base model: one standalone checkpoint (weights + tokenizer).

    python scripts/merge_lora.py runs/calibrate_emo/final runs/calibrate_emo/merged
    python scripts/merge_lora.py ADAPTER_DIR OUT_DIR --base /path/to/base-model --dtype bfloat16

``ADAPTER_DIR`` is what a run with ``model.lora`` saves (``adapter_config.json`` +
``adapter_model.safetensors``, and the tokenizer). The base model is the adapter's
``base_model_name_or_path`` unless ``--base`` is given. The result loads with
``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` without peft, and gives the same logits as
the adapted model (LoRA's update folded into the weights: W + (α/r)·B·A).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model and save a standalone checkpoint.")
    p.add_argument("adapter", help="adapter directory (a LoRA run's final/ or checkpoint-N/)")
    p.add_argument("output", help="directory for the merged checkpoint")
    p.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the adapter dir's, else the base's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="dtype of the merged weights")
    return p


def merge(adapter: str | Path, output: str | Path, base: str | None = None, tokenizer: str | None = None,
          dtype: str = "float32") -> Path:
    """Load base + adapter, fold the adapter in, save model and tokenizer to ``output``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from peft import PeftModel
    except ImportError:
        raise SystemExit("merge_lora needs peft: pip install 'emo-trainer[lora]'") from None
    adapter = Path(adapter)
    conf_path = adapter / "adapter_config.json"
    if not conf_path.is_file():
        raise MergeError(f"{adapter}: no adapter_config.json; is it the output of a run with model.lora?")
    base = base or _base_of(adapter, json.loads(conf_path.read_text()).get("base_model_name_or_path"))
    kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    tok_source = tokenizer or (str(adapter) if (adapter / "tokenizer_config.json").is_file() else base)
    tok = AutoTokenizer.from_pretrained(tok_source)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:  # e.g. a token added during training
        model.resize_token_embeddings(len(tok))
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    from .evaluation.checkpoints import backspace_id

    bk = backspace_id(merged, tok)
    if bk is not None:  # a SequenceMatch run: keep the action's id, or a reload would re-initialise its row
        merged.config.backspace_token_id = bk
    output = Path(output)
    merged.save_pretrained(str(output))
    tok.save_pretrained(str(output))
    print(f"[merge_lora] {adapter} + {base} -> {output}", flush=True)
    return output


class MergeError(UserError):
    """A user error: printed as one ``error:`` line, exit code 2."""


def _base_of(adapter: Path, recorded: str | None) -> str:
    """The adapter's base model.  A relative local path is relative to where training ran: it is
    tried as given, then from the folders above the adapter (``runs/x/final`` → the repository)."""
    if not recorded:
        raise MergeError(f"{adapter / 'adapter_config.json'} names no base model; pass --base")
    from .modeling import _looks_local

    if not _looks_local(recorded) or Path(recorded).expanduser().exists():
        return recorded
    for root in adapter.resolve().parents[:4]:
        if (root / recorded).exists():
            return str(root / recorded)
    raise MergeError(f"base model '{recorded}' (the adapter's base_model_name_or_path, a path relative to where "
                     f"training ran) is not found from here; pass --base PATH")


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        merge(args.adapter, args.output, args.base, args.tokenizer, args.dtype)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

