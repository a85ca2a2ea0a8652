"""EMO — Earth Mover Distance Optimization (Ren, Wu & Zhu, ICLR 2024, arXiv 2310.04691).

The cost of moving probability mass from token v to token y is the cosine cost
C_vy = 1 − ê_v·ê_y between L2-normalised rows of a frozen cost embedding Ê (V×d_c).
With a one-hot target the Earth Mover Distance is exact and linear in q_i = softmax(z_i):

    D_i = Σ_v q_i[v]·(1 − ê_v·ê_{y_i}) = 1 − ê_{y_i} · (Êᵀ q_i)

computed with one gather (ê_{y_i}) and one (n×V)·(V×d_c) product — never a dense one-hot
or a V×V cost matrix.  It is combined with the token cross-entropy CE_i per token:

    mode 1 (the paper's LM setting):   L_i = ½·[CE_i + w_i·D_i],  w_i = min(sg(CE_i/(D_i+ε)), ratio_cap)
    mode 2 (continual pre-training):   L_i = sg(D_i/(CE_i+ε))·CE_i + D_i

and the loss is the token mean of L_i.  Uncapped mode 1 has the *value* of CE (up to ε)
but a different gradient.  The gradient of D is ∂D_i/∂z_i[k] = q_i[k]·(Σ_v q_i[v] s_v − s_k)
with s_v = ê_v·ê_{y_i} (checked in the tests).

CE and D come from one fused pass (``fused.softmax_stats``): autograd keeps only the
logits, and the backward pass applies the closed-form gradient with one (n×d_c)(d_c×V)
product, so EMO costs two extra n×V×d_c products over MLE and no extra N×V memory.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from ..ops.fused import self_costs, softmax_stats
from .base import Objective, masked_mean
from .registry import ObjectiveError, register

#: Epsilon of the row L2-normalisation of the cost embedding (a zero row stays zero).
NORMALISE_EPS = 1e-8
#: Smallest allowed ε of the CE/D ratios: below it bf16-trained models hit NaN when D ≈ 0.
MIN_RATIO_EPS = 1e-6
COST_SOURCES = ("initial", "live")
#: ``auto``: the logits' dtype when they are bf16/fp16 (bf16 or fp16 training), else float32.
TRANSPORT_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def normalise_rows(weight: torch.Tensor) -> torch.Tensor:
    """fp32, detached, row-L2-normalised copy of ``weight`` (V×d_c) — the matrix Ê."""
    return F.normalize(weight.detach().float(), p=2.0, dim=-1, eps=NORMALISE_EPS).contiguous()


def _output_embedding(model: torch.nn.Module) -> torch.Tensor:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise ObjectiveError(
            f"EMO needs the model's output embedding (lm_head) but {type(model).__name__} has none; "
            "pass the cost embedding as a tensor or as a path to a model with an lm_head"
        )
    return head.weight


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole (V×d) matrix of a possibly sharded parameter, detached.

    FSDP2 (``fully_shard``) holds a DTensor between steps: ``full_tensor()`` all-gathers it.
    DeepSpeed ZeRO-3 holds an empty local tensor: ``GatheredParameters`` brings it back.
    Both are collectives, so every rank must call this at the same point (the trainer calls
    ``setup``/``on_step_begin`` on every rank).  An FSDP1 flat-parameter shard cannot be
    gathered from the module alone: a clear error instead of a wrong-sized cost embedding.
    """
    if hasattr(weight, "full_tensor"):  # torch.distributed.tensor.DTensor (FSDP2, TP)
        return weight.detach().full_tensor()
    if getattr(weight, "ds_numel", None) is not None:  # DeepSpeed ZeRO-3 partitioned parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            return weight.detach().clone()
    if weight.dim() != 2 or weight.numel() == 0:
        raise ObjectiveError(
            f"EMO cannot read the lm_head weight: it is sharded (local shape {tuple(weight.shape)}), e.g. by FSDP1 "
            "flat parameters. Use FSDP2 (fsdp_version: 2, configs/accelerate/fsdp.yaml), or a cost embedding "
            "read before sharding ('initial') or from a path"
        )
    return weight.detach()


def load_output_embedding(path: str) -> torch.Tensor:
    """:func:`_load_output_embedding`, with a file or directory that cannot be read as one line
    naming the option (a directory without a model, a truncated file, a pickle that
    ``torch.load(weights_only=True)`` refuses)."""
    import pickle

    try:
        return _load_output_embedding(path)
    except Exception as e:
        if isinstance(e, ValueError) and str(e).startswith("EMO "):  # already says what is wrong
            raise
        names = {c.__name__ for c in type(e).__mro__}
        if not (isinstance(e, (OSError, ValueError, KeyError, EOFError, RuntimeError, pickle.UnpicklingError)) or "SafetensorError" in names):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if isinstance(e, pickle.UnpicklingError):  # torch's weights_only message is a paragraph
            first = "the pickle holds objects that torch.load(weights_only=True) refuses to run"
        raise ValueError(
            f"EMO cost_embedding '{path}' cannot be read ({type(e).__name__}: {first}); give a local model "
            "directory (config.json + weights), a .safetensors file with one tensor or a .pt tensor, "
            "or cost_embedding='initial' / 'live'"
        ) from None


def _load_output_embedding(path: str) -> torch.Tensor:
    """The lm_head weight (V×d_c) of the model saved at ``path``.

    ``path`` is a local model directory (loaded with ``AutoModelForCausalLM``) or a file
    holding one tensor (``.pt``/``.pth`` via ``torch.load``, ``.safetensors`` with one tensor).
    """
    if os.path.isdir(path):
        from transformers import AutoModelForCausalLM

        # dtype="auto": a 7B head donor is loaded in its stored precision, not upcast to fp32.
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        weight = _output_embedding(model).detach().float().clone()
        del model
        return weight
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(path)
            if len(tensors) != 1:
                raise ObjectiveError(
                    f"EMO cost embedding file {path} holds {len(tensors)} tensors; expected exactly one (V×d_c)"
                )
            return next(iter(tensors.values())).float()
        weight = torch.load(path, map_location="cpu", weights_only=True)
        if not torch.is_tensor(weight) or weight.dim() != 2:
            raise ObjectiveError(f"EMO cost embedding file {path} must hold one 2-D tensor (V×d_c)")
        return weight.float()
    raise ObjectiveError(
        f"EMO cost_embedding '{path}' is neither 'initial', 'live' nor an existing local model "
        "directory or tensor file (the Hugging Face Hub is not queried: download the model first, "
        "e.g. with `hf download <id> --local-dir DIR`, and pass DIR)"
    )


@register
class EmoObjective(Objective):
    """Earth Mover Distance Optimization combined with MLE (see the module docstring).

    Options:
        cost_embedding: where the cost embedding E (V×d_c) comes from —
            ``"initial"`` (default): a frozen copy of the output embedding of the model
            handed to :meth:`setup` (the checkpoint training starts from); it is returned
            by :meth:`state_dict` so a resumed run uses the same matrix;
            ``"live"``: the current lm_head weight, detached and re-normalised at every
            optimizer step (:meth:`on_step_begin`);
            a path to a local model directory (or tensor file) with the same vocabulary,
            whose lm_head is used (its width d_c may differ from the model's);
            or a tensor (V×d_c) given directly.
        mode: 1 = ½[CE + w·D] with w = sg(CE/(D+ε)) (the paper's LM setting, default);
            2 = sg(D/(CE+ε))·CE + D (the authors' continual pre-training setting).
        ratio_cap: upper bound of the mode-1 weight w (default 3.0; ``None`` = uncapped).
            Uncapped mode 1 can collapse a model under a strong distribution shift.
            Mode 2's ratio D/CE is ≤ 2 by construction, so the cap does not apply to it — but mode 2 leaves
            the transport term uncapped relative to CE (docs/calibration.md, "When EMO calibration helps").
        eps: ε of the ratios, at least 1e-6 (smaller values give NaN in bf16 when D ≈ 0).
        transport_dtype: dtype of the two (n×V)(V×d_c) transport products: ``"auto"``
            (default: the logits' dtype when the model computes them in bf16/fp16 — bf16
            autocast — else float32), ``"float32"`` (TF32 on Ampere+ GPUs when
            ``training.tf32`` is on) or ``"bfloat16"`` (fastest on GPUs, fp32 accumulation).
            Everything else stays fp32, and D is formed so that its relative precision does
            not depend on q_i[y_i] (see ``fused.py``), so bf16 products give D to about 1e-2
            relative — the precision of the bf16 logits themselves.  In IEEE fp32 on an H100
            the two products alone cost ~25 ms per GPT-2 step (docs/performance.md).
            ``auto`` is a deliberate exception to docs/objectives.md's "all loss math in fp32" for
            these two products only (on a bf16 model; fp32 models get fp32): ``"float32"``
            follows the letter of the spec.  Measured D error against float64 on the same bf16
            logits (V = 512, random Ê): ``auto`` 4.8e-4 max / 6.6e-5 mean relative,
            ``float32`` 2.8e-7 max.

    Attributes:
        model_is_fresh: set to True by the trainer when the model was randomly
            initialised; :meth:`setup` then warns that an ``initial`` cost embedding is
            meaningless.
    """

    name = "emo"

    def __init__(
        self,
        cost_embedding: str | torch.Tensor = "initial",
        mode: int = 1,
        ratio_cap: float | None = 3.0,
        eps: float = 1e-6,
        transport_dtype: str = "auto",
    ) -> None:
        super().__init__()
        if int(mode) != mode or int(mode) not in (1, 2):
            raise ObjectiveError(f"EMO mode must be 1 or 2, got {mode!r}")
        if ratio_cap is not None and not (ratio_cap > 0 and math.isfinite(ratio_cap)):
            raise ObjectiveError(f"EMO ratio_cap must be a positive number or None (uncapped), got {ratio_cap!r}")
        if not (eps >= MIN_RATIO_EPS and math.isfinite(eps)):
            raise ObjectiveError(f"EMO eps must be at least {MIN_RATIO_EPS} (NaN in bf16 otherwise), got {eps!r}")
        if transport_dtype not in TRANSPORT_DTYPES:
            raise ObjectiveError(
                f"EMO transport_dtype must be one of {', '.join(TRANSPORT_DTYPES)}, got {transport_dtype!r}"
            )
        self.transport_dtype = transport_dtype
        self.mode = int(mode)
        self.ratio_cap = None if ratio_cap is None else float(ratio_cap)
        self.eps = float(eps)
        self.model_is_fresh = False
        self._cost: torch.Tensor | None = None  # Ê, fp32, (V, d_c)
        self._cost_cache: torch.Tensor | None = None  # Ê on the logits' device / dtype
        self._transport_cache: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # dtype → (Ê, self-cost)
        if torch.is_tensor(cost_embedding):
            if cost_embedding.dim() != 2:
                raise ObjectiveError(f"EMO cost_embedding tensor must be 2-D (V×d_c), got shape {tuple(cost_embedding.shape)}")
            self.source = "tensor"
            self._set_cost(normalise_rows(cost_embedding))
        else:
            self.source = str(cost_embedding)

    # ------------------------------------------------------------------ cost embedding
    @property
    def cost_embedding(self) -> torch.Tensor | None:
        """The normalised cost embedding Ê (V×d_c, fp32), or None before :meth:`setup`."""
        return self._cost

    def _set_cost(self, cost: torch.Tensor) -> None:
        self._cost = cost
        self._cost_cache = None
        self._transport_cache = {}

    def _cost_for(self, logits: torch.Tensor) -> torch.Tensor:
        if self._cost is None:
            if self.source in COST_SOURCES:
                raise RuntimeError(
                    f"EMO cost_embedding='{self.source}' needs the model: call objective.setup(model) first "
                    "(ObjectiveTrainer does this before training)"
                )
            self._set_cost(normalise_rows(load_output_embedding(self.source)))
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        cache = self._cost_cache
        if cache is None or cache.device != logits.device or cache.dtype != dtype:
            # Moved once and cached: the chunked path calls token_stats many times per step.
            cache = self._cost_cache = self._cost.to(device=logits.device, dtype=dtype)
            self._transport_cache = {}
        if cache.shape[0] != logits.shape[-1]:
            raise ObjectiveError(
                f"EMO cost embedding has {cache.shape[0]} rows but the logits have {logits.shape[-1]} "
                "vocabulary entries; use a cost embedding from a model with the same vocabulary "
                "(or cost_embedding='initial' / 'live')"
            )
        return cache

    def setup(self, model: torch.nn.Module, tokenizer: Any = None) -> None:
        """Build Ê from ``model`` (``initial``/``live``) or load it (path), and check its vocabulary size.

        After :meth:`load_state_dict` the restored matrix is kept as is (resume).
        """
        head = _output_embedding(model)
        vocab = head.ds_shape[0] if getattr(head, "ds_shape", None) is not None else head.shape[0]
        if self._cost is None or self.source == "live":
            if self.source == "initial":
                if self.model_is_fresh:
                    warnings.warn(
                        "EMO with cost_embedding='initial' on a randomly initialised model: the cost "
                        "embedding is random and the transport cost meaningless. Warm up with MLE first, "
                        "use cost_embedding='live', or a path to a trained model with the same vocabulary.",
                        stacklevel=2,
                    )
                self._set_cost(normalise_rows(full_weight(head)))
            elif self.source == "live":
                self.on_step_begin(model, 0)
            else:
                self._set_cost(normalise_rows(load_output_embedding(self.source)))
        if self._cost.shape[0] != vocab:
            raise ObjectiveError(
                f"EMO cost embedding has {self._cost.shape[0]} rows but the model's output layer has {vocab} "
                f"(cost_embedding={self.source!r}); use a cost embedding from a model with the same "
                "vocabulary, or cost_embedding='initial' / 'live'"
            )

    def on_step_begin(self, model: torch.nn.Module, step: int) -> None:
        """``live``: refresh Ê from the current lm_head (detached, re-normalised; gathered if sharded)."""
        if self.source == "live":
            self._set_cost(normalise_rows(full_weight(_output_embedding(model))))

    def state_dict(self) -> dict[str, Any]:
        # `live` is a function of the model's weights, which the checkpoint already holds.
        if self.source == "live" or self._cost is None:
            return {}
        return {"cost_embedding": self._cost.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "cost_embedding" in state:
            # Stored already normalised: kept bit for bit, not re-normalised.
            self._set_cost(state["cost_embedding"].detach().float())

    def options(self) -> dict[str, Any]:
        return {
            "cost_embedding": self.source, "mode": self.mode, "ratio_cap": self.ratio_cap, "eps": self.eps,
            "transport_dtype": self.transport_dtype,
        }

    # ------------------------------------------------------------------ formula
    #: token_stats does its math in fp32 itself: the full path hands it bf16 logits as they are.
    fp32_math_inside = True

    def _transport(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cost = self._cost_for(logits)
        # float64 logits (tests) keep float64 products; otherwise the configured dtype.
        dtype = TRANSPORT_DTYPES[self.transport_dtype]
        if cost.dtype == torch.float64:
            dtype = torch.float64
        elif dtype is None:  # auto
            dtype = logits.dtype if logits.dtype in (torch.bfloat16, torch.float16) else torch.float32
        # One entry per transport dtype (a chunked step may see two), each built once: 1 − ê_v·ê_v
        # is a float64 pass over Ê, far too costly to redo per call at a large vocabulary.
        entry = self._transport_cache.get(dtype)
        if entry is None or entry[0].device != cost.device:
            entry = self._transport_cache[dtype] = (cost.to(dtype), self_costs(cost))  # 1 − ê_v·ê_v: 0, or 1 for a zero row
        return entry

    def token_stats(self, logits, targets, extras=None):
        # D_i = 1 − ê_{y_i}·(Êᵀ q_i): a gather and one (n×V)(V×d_c) product, never a one-hot
        # (fused.py, formed without cancellation).  D ≥ 0 in exact arithmetic; rounding can leave
        # about −1e-8 when q_i sits on y_i: clamped, since a negative loss is a known EMO pitfall
        # (the clamp only touches D ≈ 0, where the gradient of D vanishes anyway).
        cost, self_cost = self._transport(logits)
        stats = softmax_stats(logits, targets, cost=cost, self_cost=self_cost)
        return {"ce": stats["ce"], "demd": stats["demd"]}

    def combine(self, stats, valid, extras=None):
        ce, demd = stats["ce"], stats["demd"]
        ce_sg, demd_sg = ce.detach(), demd.detach()
        metrics: dict[str, Any] = {"ce": masked_mean(ce, valid), "demd": masked_mean(demd, valid)}
        if self.mode == 1:
            weight = ce_sg / (demd_sg + self.eps)
            if self.ratio_cap is not None:
                weight = weight.clamp_max(self.ratio_cap)
            per_token = 0.5 * (ce + weight * demd)
            metrics["weight"] = masked_mean(weight, valid)
        else:
            ratio = demd_sg / (ce_sg + self.eps)
            per_token = ratio * ce + demd
            metrics["ratio"] = masked_mean(ratio, valid)
        loss_sum = torch.where(valid, per_token, torch.zeros_like(per_token)).sum()
        return loss_sum, metrics
