"""SequenceMatch-χ² with backspace (Cundy & Ermon, ICLR 2024, arXiv 2306.05426).

Logits are soft Q-values over the actions = vocabulary + ``<bkspc>``.  For an agent action
``a_t`` taken in state ``s_t`` with next state ``s_{t+1}``:

    Q_t = z(s_t)[a_t]
    V(s) = logsumexp_{a allowed in s} z(s)[a]        (<bkspc> allowed iff s holds a generated token)
    V'_t = V(s_{t+1}), or 0 if a_t ended the episode (terminal)
    r_t = Q_t − γ·V'_t            (implicit reward; gradient through both terms)
    w_t = γ^t

    L_SM = [−Σ_𝒟 w r + λ Σ_𝒟 w (V − γV') + cλ Σ_𝒟 w r²] / W_𝒟
         + (1−λ) [Σ_ℳ w (V − γV') + c Σ_ℳ w r²] / W_ℳ,          W_X = Σ_{t∈X} w_t
    L    = (1 − β)·MLE + β·L_SM      after ``bc_warmup_steps`` steps of MLE alone

with data trajectories 𝒟 (backspace-augmented text) and model trajectories ℳ (sampled by the
current model into a replay buffer).  There is no public reference code; the formulation
follows docs/objectives.md §5 (the paper's χ²-mixture / IQ-Learn–LS-IQ lineage).  Choices made here:

* **Normalisation.**  Each expectation is a self-normalised occupancy estimate: E_𝒟 sums are
  divided by Σ w over the batch's data actions, E_ℳ sums by Σ w over its model actions — per
  batch, never per sequence.  With no ℳ actions (offline variant, ``sample_every: 0``) the
  mixture is the data alone, so λ is taken as 1: then −r + (V − γV') = V − Q = −log π(a|s) and
  L_SM = E_𝒟[w·NLL] + c·E_𝒟[w r²] (γ-weighted NLL plus the χ² term).
* **Reduction / gradient accumulation.**  ``count_items`` counts the *clean* target tokens of
  the data micro-batch before augmentation — what MLE counts, except that the first attended
  token of a left-padded row is context (no prediction from a padding position) — and
  ``num_items_in_batch`` is their sum over the step's micro-batches (× ranks).  The MLE part is
  Σ CE / num_items_in_batch (exact under GA and DDP).  The SM part of micro-batch m is
  β·(n_m/W_𝒟,m)·S_𝒟,m / num_items_in_batch + β·(n_m/W_ℳ,m)·S_ℳ,m / num_items_in_batch, with
  n_m its clean tokens and the ratios constants: one micro-batch gives exactly L_SM above; k
  micro-batches give Σ_m (n_m/N)·L_SM,m, the token-weighted mean of the micro-batches' L_SM,
  which equals the big-batch L_SM exactly when every micro-batch has the same W/n (equal-length
  rows without noise — tested) and is otherwise a per-micro-batch self-normalised estimate (the
  convention MiLe uses for its α).  Weights of future micro-batches do not exist yet when one is
  back-propagated (augmentation and replay draws happen in ``split_batch``), so no exact global
  Σ w is available.
* **Time.**  The clock t counts agent actions of a trajectory from 0 (noise tokens do not tick).
  Model trajectories start their clock at their first sampled action; the prompt is the initial
  state.  In packed data the clock runs over the whole window (EOS inside a window is terminal
  for its own action but does not restart the clock).
* **Endings** (``terminal_mode``).  ``eos``: an action equal to EOS is terminal, V after it is 0
  (the absorbing state is worth nothing); any other last action bootstraps with the model's own
  V at the final state (a window cut from a longer text; a sample stopped by the length/action
  cap).  ``none``: nothing is terminal.
* **MLE part.**  Plain CE (softmax over all columns, ``<bkspc>`` included) of the clean data
  tokens: identical to the ``mle`` objective on the un-augmented batch, which is what the
  warm-up trains and what ``mix: 0`` reproduces.
* **Backspace augmentation.**  See :mod:`emo_trainer.objectives.sequencematch.tree`: the wrong token is
  environment noise (no term at all), the ``<bkspc>`` after it is a data action.
* **Evaluation.**  Perplexity is over the original vocabulary: :meth:`eval_logits_transform`
  sets the ``<bkspc>`` column to −∞ before plain CE; generation uses
  :func:`emo_trainer.objectives.sequencematch.sampler.sample_continuations_with_backspace`.

Diagnostics: ``ce``, ``sm_loss`` (L_SM), ``sm_v`` (mean V over data states), ``sm_reward_data`` /
``sm_reward_model`` (mean implicit reward), ``sm_bk_rate_data`` / ``sm_bk_rate_samples``
(backspace share of actions), ``sm_buffer_age`` (mean optimizer steps since the drawn samples
were made, over their actions), ``sm_buffer_size``, ``sm_model_rows`` (model trajectories in the
batch), ``sm_lambda``, ``sm_mix``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ...ops.fused import no_autocast
from ..base import IGNORE_INDEX, Objective, masked_mean
from ..mle import MleObjective
from ..registry import ObjectiveError, register
from .attention import sdpa_without_cudnn
from .backspace import BACKSPACE_TOKEN, add_backspace_token, backspace_token_id, strip_backspace_logits, unwrap_model
from .replay import ReplayBuffer, data_prefixes, sample_trajectories
from .sampler import check_custom_mask_support, sample_continuations_with_backspace
from .tree import NoiseSampler, augment_batch, collate_tapes, model_tape, pack_tapes

logger = logging.getLogger(__name__)


def _first_token_as_context(batch: dict[str, Any]) -> torch.Tensor:
    """``batch["labels"]`` with the first attended position of each row set to −100 (no copy of the
    data moves host-side; a no-op for rows that are not left-padded, whose position 0 is never a
    target)."""
    labels = batch["labels"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None or attention_mask.dim() != 2:
        return labels
    first = attention_mask.long().argmax(1, keepdim=True)
    return labels.scatter(1, first, IGNORE_INDEX)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@register
class SequenceMatchObjective(Objective):
    """SequenceMatch-χ² with backspace (see the module docstring for the formula and choices).

    Options (the ``objective.sequencematch`` section of a config):
        gamma: discount γ of the soft Bellman residual and of the weights w_t = γ^t (0.998).
        chi2_coef: c, weight of the χ² term r² (0.0025 = α/4 with the paper's α = 0.01).
        lam: λ, the share of data states in the mixture that the V-term and the χ² term are
            taken over (0.5); forced to 1 when a batch has no model trajectories.
        mix: β in (1 − β)·MLE + β·L_SM after the warm-up (0.5; 0 = MLE on clean tokens).
        bc_warmup_steps: optimizer steps of plain MLE before SequenceMatch starts (0): no
            augmentation, no sampling, exactly the ``mle`` objective.
        noise_rate: probability, per clean data action, of inserting a wrong token followed by
            ``<bkspc>`` before it (0.05).
        noise_token: where wrong tokens come from: ``random`` (uniform over the original
            vocabulary minus special tokens and the true token) or ``unigram`` (a token of the
            same micro-batch).
        sample_every: refill the replay buffer every this many optimizer steps (4); 0 = the
            offline variant (no model trajectories, no sampling).
        buffer_size: capacity of the FIFO replay buffer, in trajectories, per process (256).
        samples_per_refill: continuations sampled per refill (0 = one per row of the
            micro-batch that triggers the refill).
        model_rows: model trajectories drawn into each micro-batch (0 = as many as data rows).
        pack_samples: pack several model trajectories into one row of the forward pass (each
            sees only its own tokens), up to the data rows' length (True); saves the padding of
            short samples.
        prefix_tokens: length of the data prefix a continuation is sampled from (32; half the
            row for shorter rows).
        max_new_tokens: surviving generated tokens at which a sample stops (64).
        max_actions: cap on the actions of one sample, backspaces included (0 = 2·max_new_tokens).
        sample_temperature: sampling temperature of the model trajectories (1.0 = the policy).
        sample_batch_size: prompts per sampling batch (64).
        pad_to_multiple_of: the forward pass's row length (augmented data rows and packed samples)
            is rounded up to a multiple of this with padding nodes that change nothing in the loss
            (8); few distinct shapes (``torch.compile``, per-shape kernel choices) and
            tensor-core friendly sizes.  1 = no rounding.
        terminal_mode: ``eos`` (an EOS action ends the episode: V after it is 0) or ``none``.
        backspace_token: the token string of the backspace action (``<bkspc>``).
        seed: seed of augmentation, replay draws and sampling (offset by the process rank).
    """

    name = "sequencematch"
    extra_position_keys = ("sm_actions", "sm_bk_allowed")
    #: policy_stats upcasts block by block: bf16 logits are used as they are (no fp32 N×V copy).
    fp32_math_inside = True

    def __init__(
        self,
        gamma: float = 0.998,
        chi2_coef: float = 0.0025,
        lam: float = 0.5,
        mix: float = 0.5,
        bc_warmup_steps: int = 0,
        noise_rate: float = 0.05,
        noise_token: str = "random",
        sample_every: int = 4,
        buffer_size: int = 256,
        samples_per_refill: int = 0,
        model_rows: int = 0,
        pack_samples: bool = True,
        prefix_tokens: int = 32,
        max_new_tokens: int = 64,
        max_actions: int = 0,
        sample_temperature: float = 1.0,
        sample_batch_size: int = 64,
        pad_to_multiple_of: int = 8,
        terminal_mode: str = "eos",
        backspace_token: str = BACKSPACE_TOKEN,
        seed: int = 0,
    ) -> None:
        super().__init__()
        checks = [
            (0.0 < gamma <= 1.0, f"gamma must be in (0, 1], got {gamma}"),
            (chi2_coef >= 0.0, f"chi2_coef must be ≥ 0, got {chi2_coef}"),
            (0.0 <= lam <= 1.0, f"lam must be in [0, 1], got {lam}"),
            (0.0 <= mix <= 1.0, f"mix must be in [0, 1], got {mix}"),
            (0.0 <= noise_rate < 1.0, f"noise_rate must be in [0, 1), got {noise_rate}"),
            (noise_token in NoiseSampler.MODES, f"noise_token must be one of {NoiseSampler.MODES}, got {noise_token!r}"),
            (terminal_mode in ("eos", "none"), f"terminal_mode must be 'eos' or 'none', got {terminal_mode!r}"),
            (min(bc_warmup_steps, sample_every, samples_per_refill, model_rows, max_actions) >= 0,
             "bc_warmup_steps, sample_every, samples_per_refill, model_rows and max_actions must be ≥ 0"),
            (min(buffer_size, prefix_tokens, max_new_tokens, sample_batch_size, pad_to_multiple_of) >= 1,
             "buffer_size, prefix_tokens, max_new_tokens, sample_batch_size and pad_to_multiple_of must be ≥ 1"),
            (sample_temperature > 0, f"sample_temperature must be > 0, got {sample_temperature}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ObjectiveError(f"sequencematch: {msg}")
        self.gamma, self.chi2_coef, self.lam, self.mix = float(gamma), float(chi2_coef), float(lam), float(mix)
        self.bc_warmup_steps = int(bc_warmup_steps)
        self.noise_rate, self.noise_token = float(noise_rate), noise_token
        self.sample_every, self.buffer_size = int(sample_every), int(buffer_size)
        self.samples_per_refill, self.model_rows = int(samples_per_refill), int(model_rows)
        self.pack_samples = bool(pack_samples)
        self.prefix_tokens, self.max_new_tokens = int(prefix_tokens), int(max_new_tokens)
        self.max_actions = int(max_actions) or 2 * self.max_new_tokens
        self.sample_temperature, self.sample_batch_size = float(sample_temperature), int(sample_batch_size)
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.terminal_mode, self.backspace_token, self.seed = terminal_mode, backspace_token, int(seed)

        self._mle = MleObjective()  # the warm-up loss, and the definition of the MLE part
        self.backspace_id: int | None = None
        self.eos_token_id: int | None = None
        self.pad_token_id: int = 0
        self.noise: NoiseSampler | None = None
        self.buffer = ReplayBuffer(self.buffer_size)
        self.last_sample_stats: dict[str, float] = {}
        self._step = 0
        self._refill_due = False
        self._gen: torch.Generator | None = None  # CPU: augmentation and replay draws
        self._sample_gen: torch.Generator | None = None  # model device: sampling
        self._pending_sample_state: torch.Tensor | None = None

    # ------------------------------------------------------------------ options / state
    def options(self) -> dict[str, Any]:
        keys = ("gamma", "chi2_coef", "lam", "mix", "bc_warmup_steps", "noise_rate", "noise_token", "sample_every",
                "buffer_size", "samples_per_refill", "model_rows", "pack_samples", "prefix_tokens", "max_new_tokens",
                "max_actions", "sample_temperature", "sample_batch_size", "pad_to_multiple_of", "terminal_mode", "backspace_token", "seed")
        return {k: getattr(self, k) for k in keys}

    @property
    def online(self) -> bool:
        """True when model trajectories are sampled (``sample_every > 0``)."""
        return self.sample_every > 0

    def in_warmup(self, step: int | None = None) -> bool:
        """True during the ``bc_warmup_steps`` of plain MLE."""
        return (self._step if step is None else step) < self.bc_warmup_steps

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self._step, "refill_due": self._refill_due, "buffer": self.buffer.state_dict()}
        if self._gen is not None:
            state["rng_cpu"] = self._gen.get_state()
        if self._sample_gen is not None:
            state["rng_sample"] = self._sample_gen.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._step = int(state.get("step", 0))
        self._refill_due = bool(state.get("refill_due", False))
        if "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])
        if "rng_cpu" in state:
            self._generator().set_state(state["rng_cpu"])
        # The sampling generator lives on the model's device, unknown here: applied when created.
        self._pending_sample_state = state.get("rng_sample")

    # ------------------------------------------------------------------ hooks
    #: The evaluation sampler for models trained with this objective (the ``Sampler`` protocol of
    #: :mod:`emo_trainer.evaluation.generation`): backspace enabled, final text with deletions applied.
    generation_sampler = staticmethod(sample_continuations_with_backspace)

    def forward_context(self):
        """The training forward sees a tree mask whose length changes every step: keep SDPA off
        cuDNN, which rebuilds its graph per call for such masks (``emo_trainer/objectives/sequencematch/attention.py``)."""
        return sdpa_without_cudnn()

    def prepare_model(self, model: torch.nn.Module, tokenizer: Any) -> int:
        """Add ``<bkspc>`` when the model is built, before the optimizer exists; returns its id."""
        tid = add_backspace_token(model, tokenizer, token=self.backspace_token)
        self.setup(model, tokenizer)
        return tid

    def setup(self, model: torch.nn.Module, tokenizer: Any = None) -> None:
        """Record the backspace id, EOS, padding and noise vocabulary; add ``<bkspc>`` if missing.

        The token should already have been added with :func:`add_backspace_token` when the
        model was built (before the optimizer exists); if it is missing it is added here, with a
        warning, which is only safe before the optimizer is created.
        """
        model = unwrap_model(model)
        check_custom_mask_support(model)
        if tokenizer is not None:
            had = backspace_token_id(tokenizer, token=self.backspace_token) is not None and getattr(
                model.config, "backspace_token_id", None) is not None
            if not had:
                logger.warning(
                    "sequencematch: adding %s to the model in setup(); call add_backspace_token(model, tokenizer) "
                    "when building the model, before the optimizer is created", self.backspace_token)
            self.backspace_id = add_backspace_token(model, tokenizer, token=self.backspace_token)
            special = list(getattr(tokenizer, "all_special_ids", []) or [])
            eos = tokenizer.eos_token_id
            pad = tokenizer.pad_token_id
        else:
            self.backspace_id = backspace_token_id(model=model)
            if self.backspace_id is None:
                raise ObjectiveError(
                    "sequencematch: the model has no backspace token; call add_backspace_token(model, tokenizer)")
            special, eos, pad = [], getattr(model.config, "eos_token_id", None), getattr(model.config, "pad_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        self.eos_token_id = None if eos is None else int(eos)
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_id if self.eos_token_id is not None else 0))
        self.noise = NoiseSampler(self.backspace_id, exclude=special + [self.backspace_id], mode=self.noise_token)

    def on_step_begin(self, model: torch.nn.Module, step: int) -> None:
        """Track the optimizer step; mark a buffer refill every ``sample_every`` steps after warm-up.

        The refill itself happens in the next :meth:`split_batch`, which has data prefixes (this
        process's shard of the batch, so each process samples its share).
        """
        self._step = int(step)
        if self.online and not self.in_warmup() and (self._step - self.bc_warmup_steps) % self.sample_every == 0:
            self._refill_due = True

    def eval_logits_transform(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits for perplexity on clean text: ``<bkspc>`` excluded and renormalised away."""
        return strip_backspace_logits(logits, self.backspace_id)

    # ------------------------------------------------------------------ batches
    def _generator(self) -> torch.Generator:
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed + 1000 * _rank())
        return self._gen

    def _sampling_generator(self, device: torch.device) -> torch.Generator:
        if self._sample_gen is None or self._sample_gen.device != device:
            self._sample_gen = torch.Generator(device=device).manual_seed(self.seed + 1000 * _rank() + 1)
            if self._pending_sample_state is not None:
                self._sample_gen.set_state(self._pending_sample_state.cpu())
                self._pending_sample_state = None
        return self._sample_gen

    def _ensure_setup(self, model: torch.nn.Module) -> None:
        if self.backspace_id is None:
            self.setup(model, None)

    def refill(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, float]:
        """Sample continuations of prefixes of these rows with the current model into the buffer."""
        self._ensure_setup(model)
        model = unwrap_model(model)
        prompts = data_prefixes(input_ids, attention_mask, self.prefix_tokens, self.samples_per_refill or None)
        device = next(model.parameters()).device
        trajs, stats = sample_trajectories(
            model, prompts, backspace_token_id=self.backspace_id, step=self._step, max_new_tokens=self.max_new_tokens,
            max_actions=self.max_actions, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            temperature=self.sample_temperature, batch_size=self.sample_batch_size,
            generator=self._sampling_generator(device),
        )
        self.buffer.push(trajs)
        self.last_sample_stats = stats
        self._refill_due = False
        return stats

    def split_batch(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Build the SequenceMatch forward pass of a collated data micro-batch.

        In eval mode or during the warm-up: the base split (plain batch, plain MLE).  Otherwise:
        backspace-augmented data rows, plus (online) ``model_rows`` trajectories drawn from the
        replay buffer — refilled first from this batch's prefixes when due or empty — appended
        as extra rows flagged as ℳ (several per row with ``pack_samples``).  Returns
        ``(model_inputs, loss_inputs)`` as documented in
        :func:`emo_trainer.objectives.sequencematch.tree.collate_tapes`: ``input_ids``, ``position_ids`` = depth
        and a (B', 1, T', T') additive ancestor mask for the model; ``labels`` (clean targets
        only) and the ``sm_*`` tensors for the loss.
        """
        if not model.training:
            return super().split_batch(model, batch)
        if self.in_warmup():  # plain MLE on the targets SequenceMatch trains (see count_items)
            model_inputs, loss_inputs = super().split_batch(model, batch)
            loss_inputs["labels"] = _first_token_as_context(batch)
            return model_inputs, loss_inputs
        self._ensure_setup(model)
        device = batch["input_ids"].device
        attention_mask = batch.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("sequencematch expects a 2-D padding attention_mask in the data batch")
        # The augmentation runs on the host: one device→host copy of the batch (the step's only
        # synchronisation, before any of its device work is queued); every check below is on it.
        input_ids, attention_mask, labels, pos = _to_host(
            batch["input_ids"], attention_mask, batch.get("labels"), batch.get("position_ids"))
        if pos is not None:
            default = torch.arange(input_ids.shape[1]).expand_as(input_ids)
            if attention_mask is not None:
                default = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            if not torch.equal(pos, default):
                raise ValueError("sequencematch does not support packed rows with custom position_ids")
        data = augment_batch(
            input_ids, labels, attention_mask, backspace_id=self.backspace_id,
            noise_rate=self.noise_rate, noise=self.noise, eos_token_id=self.eos_token_id,
            terminal_mode=self.terminal_mode, generator=self._generator(),
        )
        sampled = []
        if self.online:
            if self._refill_due or len(self.buffer) == 0:
                self.refill(model, input_ids, attention_mask)
            n = self.model_rows or len(data)
            sampled = [
                model_tape(traj.prompt, traj.actions, self.backspace_id,
                           terminal=traj.terminal and self.terminal_mode == "eos", age=self._step - traj.step)
                for traj in self.buffer.draw(n, self._generator())
            ]
            if self.pack_samples and sampled:
                sampled = pack_tapes(sampled, capacity=int(data.length.max()))
        return collate_tapes(sampled, data=data, gamma=self.gamma, pad_token_id=self.pad_token_id,
                             pad_to_multiple_of=self.pad_to_multiple_of, dtype=_mask_dtype(unwrap_model(model), device), device=device)

    def count_items(self, batch: dict[str, Any]) -> torch.Tensor:
        """Clean targets of the micro-batch: the base count, except that the first attended token
        of a left-padded row is context (the augmentation gives it no prediction — it would be
        predicted from a padding position), so ``num_items_in_batch`` counts exactly the targets
        trained on, warm-up included."""
        return (_first_token_as_context(batch)[..., 1:] != IGNORE_INDEX).sum()

    # ------------------------------------------------------------------ formula
    def token_stats(self, logits, targets, extras=None):
        if not extras or "sm_actions" not in extras:  # warm-up / plain batch: exactly the `mle` objective
            return {"ce": self._mle.token_stats(logits, targets)["ce"]}
        ce, v, q = policy_stats(logits, targets, extras["sm_actions"], extras["sm_bk_allowed"], self.backspace_id)
        return {"ce": ce, "v": v, "q": q}

    def combine(self, stats, valid, extras=None):
        extras = extras or {}
        ce = stats["ce"]
        ce_sum = torch.where(valid, ce, torch.zeros_like(ce)).sum()
        metrics: dict[str, Any] = {"ce": masked_mean(ce, valid)}
        if "sm_state" not in extras:  # warm-up / plain batch: MLE
            metrics["sm_mix"] = 0.0
            return ce_sum, metrics
        v, q = stats["v"], stats["q"]
        state, slot, nxt = extras["sm_state"], extras["sm_slot"], extras["sm_next"]
        b, a = state.shape
        t = v.shape[0] // b
        row = torch.arange(b, device=v.device)[:, None] * t
        si = (row + state).reshape(-1)
        ni = (row + nxt.clamp_min(0)).reshape(-1)
        terminal = (nxt < 0).reshape(-1)
        v_s = v[si]
        q_a = q[si, slot.reshape(-1)]
        v_n = torch.where(terminal, torch.zeros_like(v_s), v[ni])
        r = q_a - self.gamma * v_n
        dv = v_s - self.gamma * v_n
        amask = extras["sm_action_mask"].reshape(-1)
        is_model = extras["sm_is_model"][:, None].expand(b, a).reshape(-1)
        in_d, in_m = amask & ~is_model, amask & is_model
        w = extras["sm_weight"].reshape(-1).float()
        w_d, w_m = torch.where(in_d, w, torch.zeros_like(w)), torch.where(in_m, w, torch.zeros_like(w))
        # No host sync: λ (forced to 1 without model actions) and the empty cases as tensor selects.
        has_model = in_m.any()

        def pick(with_model: float, without: float) -> torch.Tensor:
            f64 = {"dtype": torch.float64, "device": v.device}  # 0-d: the math stays in v's dtype
            return torch.where(has_model, torch.tensor(with_model, **f64), torch.tensor(without, **f64))

        lam = pick(self.lam, 1.0)
        s_d = (w_d * (-r + lam * dv + pick(self.chi2_coef * self.lam, self.chi2_coef) * r * r)).sum()
        s_m = (w_m * ((1.0 - lam) * (dv + self.chi2_coef * r * r))).sum()
        wsum_d, wsum_m = w_d.sum().detach(), w_m.sum().detach()
        one = torch.ones((), dtype=wsum_d.dtype, device=wsum_d.device)
        # An empty set has w = 0 everywhere, so its sum S is 0 (and so is its gradient): S / 1.
        l_d = s_d / torch.where(wsum_d > 0, wsum_d, one)
        l_m = s_m / torch.where(wsum_m > 0, wsum_m, one)
        n_clean = valid.sum().to(ce.dtype)
        sm_sum = n_clean * (l_d + l_m)  # = (n/W_𝒟)·S_𝒟 + (n/W_ℳ)·S_ℳ, see the module docstring
        loss_sum = (1.0 - self.mix) * ce_sum + self.mix * sm_sum

        acts = extras["sm_actions"].reshape(b * t, -1)[si, slot.reshape(-1)]
        is_bk = (acts == self.backspace_id).float()
        ages = extras["sm_age"].reshape(-1).float()
        n_traj = 0
        if "sm_num_trajectories" in extras:
            n_traj = torch.where(extras["sm_is_model"], extras["sm_num_trajectories"], 0).sum()
        metrics.update({
            "sm_loss": (l_d + l_m).detach(),
            "sm_v": masked_mean(v_s, in_d),
            "sm_reward_data": masked_mean(r, in_d),
            "sm_reward_model": masked_mean(r, in_m),
            "sm_bk_rate_data": masked_mean(is_bk, in_d),
            "sm_bk_rate_samples": masked_mean(is_bk, in_m),
            "sm_buffer_age": masked_mean(ages, in_m),
            "sm_buffer_size": float(len(self.buffer)),
            "sm_model_rows": n_traj,  # model trajectories in the batch (several may share a row)
            "sm_lambda": lam,
            "sm_mix": self.mix,
        })
        return loss_sum, metrics


def _to_host(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """CPU int64 copies of same-shape integer/bool tensors (None stays None), with ONE device→host
    transfer for all of them (each ``.cpu()`` of a device tensor would wait for the device)."""
    present = [t for t in tensors if t is not None]
    if len({tuple(t.shape) for t in present}) > 1:  # not stackable: one copy each
        return [None if t is None else t.detach().long().cpu() for t in tensors]
    host = iter(torch.stack([t.detach().long() for t in present]).cpu().unbind(0))
    return [None if t is None else next(host) for t in tensors]


def _mask_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """dtype of the additive tree mask: the one attention will use, so it is never converted.

    Under autocast, SDPA is a lower-precision op: a float32 mask would be cast to the autocast
    dtype by every layer (a full (B, T, T) copy each), so the mask is built in that dtype once.
    Hidden entries are that dtype's minimum; the softmax gives them exactly 0 either way (every
    node sees itself), so attention computes the same values.
    """
    dtype = model.dtype if model.dtype.is_floating_point else torch.float32
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (TypeError, RuntimeError, AttributeError):  # device types without autocast support
        pass
    return dtype


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_blocks(n: int, vocab: int, block_elements: int):
    rows = max(1, block_elements // max(vocab, 1))
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def _max_without(z: torch.Tensor, bk: int) -> torch.Tensor:
    """Row max over every column but ``bk`` (one read of the block, two strided slices)."""
    if bk <= 0:
        return z[:, 1:].amax(-1)
    if bk >= z.shape[1] - 1:
        return z[:, :bk].amax(-1)
    return torch.maximum(z[:, :bk].amax(-1), z[:, bk + 1:].amax(-1))


def _sub_upcast(z: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``z − col[:, None]`` in ``col``'s (compute) dtype: one fused read-upcast-write on CUDA; on
    CPU, where mixed-dtype elementwise ops go through a slow path, an upcast copy then in place."""
    if z.dtype == col.dtype or z.device.type == "cuda":
        return torch.sub(z, col[:, None])
    return z.to(col.dtype).sub_(col[:, None])


def _mul_into(out: torch.Tensor, u: torch.Tensor, coef: torch.Tensor) -> None:
    """``out[:] = u · coef[:, None]`` rounded once into ``out``'s dtype (``u`` may be overwritten)."""
    if out.dtype == u.dtype or u.device.type == "cuda":
        torch.mul(u, coef[:, None], out=out)  # CUDA stores in out's dtype inside the same kernel
    else:
        out.copy_(u.mul_(coef[:, None]))


class _PolicyStats(torch.autograd.Function):
    """(CE, V, Q) of each row of ``logits``; see :func:`policy_stats`.

    The logits stay in their own dtype (bf16 under autocast: no fp32 N×V copy); each block of
    rows is upcast inside one fused op and the math runs in fp32 (float64 for float64 logits).
    With m = max over the columns other than ``<bkspc>`` and S = Σ_{v≠bk} exp(z_v − m) ≥ 1:

        V_wo = m + log S,   lse = m + logaddexp(log S, z_bk − m),   CE = (lse − m) − (z_y − m),

    exact and stable however much mass ``<bkspc>`` holds (no cancellation, no recomputed rows).
    Forward: one max over all rows, then per block one upcasting subtract, one in-place exp, one
    sum; the per-row arithmetic runs once on (N,) vectors.  Backward: the gradient off the special
    columns is exp(z − V)·(g_CE·exp(V − lse) + g_V) (every factor ≤ 1 in magnitude times the
    incoming gradients), written straight into a tensor of the logits' dtype (per block one
    subtract, one in-place exp, one multiply that stores in that dtype); the few special columns
    (target, actions, ``<bkspc>``) of all rows are then overwritten with their exact values in one
    pass.  Few Python-level ops per block (the step's host time) and no host↔device synchronisation.
    """

    @staticmethod
    def forward(ctx, logits, targets, actions, bk_allowed, bk, block_elements):
        with no_autocast(logits.device):
            n, vocab = logits.shape
            ct = _compute_dtype(logits.dtype)
            # Per-row work once for all rows; the loop keeps only the N×V passes (3 ops a block).
            m = _max_without(logits, bk).to(ct)
            t_gold = logits.gather(1, targets[:, None]).squeeze(1).to(ct) - m  # z_y − m
            t_bk = logits[:, bk].to(ct) - m
            log_s = torch.empty(n, dtype=ct, device=logits.device)
            for sl in _row_blocks(n, vocab, block_elements):
                t = _sub_upcast(logits[sl], m[sl])  # z − m in the compute dtype
                t.exp_()
                t[:, bk] = 0.0
                torch.sum(t, -1, out=log_s[sl])
                del t
            log_s.log_()
            rel = torch.logaddexp(log_s, t_bk)  # lse − m
            lse = m + rel
            v = m + torch.where(bk_allowed, rel, log_s)
            ce = rel - t_gold
            valid = actions >= 0
            q = torch.where(valid, logits.gather(1, actions.clamp_min(0)).to(ct), torch.zeros((), dtype=ct, device=logits.device))
        ctx.save_for_backward(logits, targets, actions, bk_allowed, lse, v)
        ctx.bk, ctx.block_elements = bk, block_elements
        ctx.set_materialize_grads(False)
        return ce, v, q

    @staticmethod
    def backward(ctx, g_ce, g_v, g_q):
        if not ctx.needs_input_grad[0] or (g_ce is None and g_v is None and g_q is None):
            return (None,) * 6
        logits = ctx.saved_tensors[0]
        with no_autocast(logits.device):
            return _PolicyStats._backward(ctx, g_ce, g_v, g_q)

    @staticmethod
    def _backward(ctx, g_ce, g_v, g_q):
        logits, targets, actions, bk_allowed, lse, v = ctx.saved_tensors
        n, vocab = logits.shape
        bk, ct, dev = ctx.bk, lse.dtype, logits.device
        zeros = torch.zeros(n, dtype=ct, device=dev)
        g_ce = zeros if g_ce is None else g_ce.to(ct)
        g_v = zeros if g_v is None else g_v.to(ct)
        k = actions.shape[1]
        g_q = torch.zeros((n, k), dtype=ct, device=dev) if g_q is None else g_q.to(ct)
        # The special columns of each row: target, the actions (−1 padding → the target, with no
        # contribution of its own), <bkspc>; and what each adds beyond the softmax-type part.
        valid = actions >= 0
        cols = torch.cat([targets[:, None], torch.where(valid, actions, targets[:, None]), torch.full_like(targets[:, None], bk)], 1)
        extra = torch.cat([-g_ce[:, None], torch.where(valid, g_q, torch.zeros_like(g_q)), torch.zeros_like(g_ce[:, None])], 1)
        # ∂CE/∂z = softmax − onehot(y); ∂V/∂z = the policy over the allowed actions
        # = exp(z − V) off <bkspc>, and on it exp(z_bk − lse) where allowed (V = lse), 0 where masked.
        coef = g_ce * torch.exp(v - lse) + g_v
        grad = torch.empty_like(logits)
        for sl in _row_blocks(n, vocab, ctx.block_elements):  # the N×V passes only: 3 ops a block
            u = _sub_upcast(logits[sl], v[sl])
            u.exp_()
            _mul_into(grad[sl], u, coef[sl])  # one rounding into the logits' dtype
            del u
        # The special columns of every row at once (N×(K+2) values), overwritten with their exact values.
        zc = logits.gather(1, cols).to(ct)
        p_bk = torch.exp(logits[:, bk].to(ct) - lse)
        bk_val = p_bk * (g_ce + torch.where(bk_allowed, g_v, torch.zeros_like(g_v)))
        base = torch.where(cols == bk, bk_val[:, None], torch.exp(zc - v[:, None]) * coef[:, None])
        same = (cols[:, :, None] == cols[:, None, :]).to(ct)
        total = base + torch.bmm(same, extra[:, :, None]).squeeze(2)  # duplicates get the same total
        grad[torch.arange(n, device=dev)[:, None], cols] = total.to(grad.dtype)  # index_put: no sync
        return grad, None, None, None, None, None


def policy_stats(
    logits: torch.Tensor, targets: torch.Tensor, actions: torch.Tensor, bk_allowed: torch.Tensor, backspace_id: int,
    block_elements: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``CE = lse(z) − z[y]`` (all columns), ``V = logsumexp`` over the allowed actions
    (no ``<bkspc>`` where ``bk_allowed`` is False) and ``Q = z[actions]`` (n, K; 0 for the −1
    padding of ``actions``) of (n, V) logits, in fp32 (float64 for float64 logits) whatever the
    logits' dtype.

    A custom autograd Function: autograd keeps only the logits as given (bf16 logits stay bf16:
    no N×V fp32 copy, no softmax or one-hot copies); forward and backward each make one exp pass
    over blocks of rows (``block_elements`` per fp32 temporary) with the closed-form gradients
    softmax − onehot, the masked policy and onehot(actions); the gradient comes back in the
    logits' dtype.
    """
    rows_ok = logits.dim() == 2 and logits.shape[1] >= 2
    if not rows_ok:
        raise ValueError(f"policy_stats expects (n, V ≥ 2) logits, got shape {tuple(logits.shape)}")
    return _PolicyStats.apply(logits, targets, actions, bk_allowed, int(backspace_id), int(block_elements))


__all__ = ["SequenceMatchObjective", "policy_stats"]
