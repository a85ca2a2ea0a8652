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
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from .base import Objective, masked_mean
from .registry import register

#: Epsilon of the row L2-normalisation of the cost embedding (a zero row stays zero).
NORMALISE_EPS = 1e-8
#: Smallest allowed ε of the CE/D ratios: below it bf16-trained models hit NaN when D ≈ 0.
MIN_RATIO_EPS = 1e-6
COST_SOURCES = ("initial", "live")


def normalise_rows(weight: torch.Tensor) -> torch.Tensor:
    """fp32, detached, row-L2-normalised copy of ``weight`` (V×d_c) — the matrix Ê."""
    return F.normalize(weight.detach().float(), p=2.0, dim=-1, eps=NORMALISE_EPS).contiguous()


def _output_embedding(model: torch.nn.Module) -> torch.Tensor:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(
            f"EMO needs the model's output embedding (lm_head) but {type(model).__name__} has none; "
            "pass the cost embedding as a tensor or as a path to a model with an lm_head"
        )
    return head.weight


def load_output_embedding(path: str) -> torch.Tensor:
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
                raise ValueError(
                    f"EMO cost embedding file {path} holds {len(tensors)} tensors; expected exactly one (V×d_c)"
                )
            return next(iter(tensors.values())).float()
        weight = torch.load(path, map_location="cpu", weights_only=True)
        if not torch.is_tensor(weight) or weight.dim() != 2:
            raise ValueError(f"EMO cost embedding file {path} must hold one 2-D tensor (V×d_c)")
        return weight.float()
    raise ValueError(
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
            Mode 2's ratio D/CE is ≤ 2 by construction, so the cap does not apply to it.
        eps: ε of the ratios, at least 1e-6 (smaller values give NaN in bf16 when D ≈ 0).

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
    ) -> None:
        super().__init__()
        if int(mode) != mode or int(mode) not in (1, 2):
            raise ValueError(f"EMO mode must be 1 or 2, got {mode!r}")
        if ratio_cap is not None and not (ratio_cap > 0 and math.isfinite(ratio_cap)):
            raise ValueError(f"EMO ratio_cap must be a positive number or None (uncapped), got {ratio_cap!r}")
        if not (eps >= MIN_RATIO_EPS and math.isfinite(eps)):
            raise ValueError(f"EMO eps must be at least {MIN_RATIO_EPS} (NaN in bf16 otherwise), got {eps!r}")
        self.mode = int(mode)
        self.ratio_cap = None if ratio_cap is None else float(ratio_cap)
        self.eps = float(eps)
        self.model_is_fresh = False
        self._cost: torch.Tensor | None = None  # Ê, fp32, (V, d_c)
        self._cost_cache: torch.Tensor | None = None  # Ê on the logits' device / dtype
        if torch.is_tensor(cost_embedding):
            if cost_embedding.dim() != 2:
                raise ValueError(f"EMO cost_embedding tensor must be 2-D (V×d_c), got shape {tuple(cost_embedding.shape)}")
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
        if cache.shape[0] != logits.shape[-1]:
            raise ValueError(
                f"EMO cost embedding has {cache.shape[0]} rows but the logits have {logits.shape[-1]} "
                "vocabulary entries; use a cost embedding from a model with the same vocabulary "
                "(or cost_embedding='initial' / 'live')"
            )
        return cache

    def setup(self, model: torch.nn.Module, tokenizer: Any = None) -> None:
        """Build Ê from ``model`` (``initial``/``live``) or load it (path), and check its vocabulary size.

        After :meth:`load_state_dict` the restored matrix is kept as is (resume).
        """
        vocab = _output_embedding(model).shape[0]
        if self._cost is None or self.source == "live":
            if self.source == "initial":
                if self.model_is_fresh:
                    warnings.warn(
                        "EMO with cost_embedding='initial' on a randomly initialised model: the cost "
                        "embedding is random and the transport cost meaningless. Warm up with MLE first, "
                        "use cost_embedding='live', or a path to a trained model with the same vocabulary.",
                        stacklevel=2,
                    )
                self._set_cost(normalise_rows(_output_embedding(model)))
            elif self.source == "live":
                self.on_step_begin(model, 0)
            else:
                self._set_cost(normalise_rows(load_output_embedding(self.source)))
        if self._cost.shape[0] != vocab:
            raise ValueError(
                f"EMO cost embedding has {self._cost.shape[0]} rows but the model's output layer has {vocab} "
                f"(cost_embedding={self.source!r}); use a cost embedding from a model with the same "
                "vocabulary, or cost_embedding='initial' / 'live'"
            )

    def on_step_begin(self, model: torch.nn.Module, step: int) -> None:
        """``live``: refresh Ê from the current lm_head (detached, re-normalised)."""
        if self.source == "live":
            self._set_cost(normalise_rows(_output_embedding(model)))

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
        return {"cost_embedding": self.source, "mode": self.mode, "ratio_cap": self.ratio_cap, "eps": self.eps}

    # ------------------------------------------------------------------ formula
    def token_stats(self, logits, targets, extras=None):
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        cost = self._cost_for(logits)
        logp = torch.log_softmax(logits, dim=-1)
        ce = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        q = logp.exp()  # from log_softmax: no second softmax pass
        # D_i = 1 − ê_{y_i}·(Êᵀ q_i): one (n×V)(V×d_c) product, then a row-wise dot.
        # D ≥ 0 in exact arithmetic (ê_v·ê_y ≤ 1), but when q_i sits on y_i the rounding of
        # ê_y·ê_y leaves about −1e-8: clamped, since a negative loss is a known EMO pitfall.
        # The clamp only touches D ≈ 0, where the gradient of D vanishes anyway.
        demd = (1.0 - ((q @ cost) * cost[targets]).sum(-1)).clamp_min(0.0)
        return {"ce": ce, "demd": demd}

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
