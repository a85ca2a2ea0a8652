"""Trajectories with backspaces as one forward pass: tapes, augmentation, tree masks.

A trajectory is a protected context (prompt / first token of a data window) followed by
actions: vocabulary tokens and ``<bkspc>``.  Its states are token lists.  SequenceMatch needs
the logits of every state; we get them all from ONE forward pass over a *tape*:

* the tape holds the non-backspace tokens in the order they were typed (deleted ones included);
* a tape node's state is the node plus its surviving ancestors, so it is fed with
  ``position_ids`` = its depth (index in that state) and a 4-D attention mask letting it see
  exactly those ancestors;
* the state after a backspace is the state of the deleted node's parent, a node already on the
  tape, so backspaces cost no extra position.

Ancestor mask without walking parents: nodes are created in tape order and deleted in stack
order, so node ``k`` is in the state of node ``q`` iff it was created no later than ``q`` and
not yet deleted when ``q`` was created.  With ``death[k]`` = number of nodes created before
``k`` was deleted (∞ if never), ``allowed[q, k] = (k ≤ q) & (q < death[k])``.

Actions are kept as per-row lists (state node, slot, next-state node, clock ``t``): a node can
be the state of several actions (type ``x``, delete it, type ``y`` from the same state), so the
objective gathers ``Q = z[state][action]`` through a small per-node table of action ids
(``sm_actions``, shape (B, T, K)) rather than through shifted labels.

Data augmentation (docs/objectives.md §5): before each data action, with probability
``noise_rate``, a wrong token ``w`` is inserted and then deleted.  ``w`` is environment noise:
it is on the tape (its state is needed for the ``<bkspc>`` that follows) but it is not an
action of the trajectory.  The ``<bkspc>`` is a data action from the noisy state back to the
clean state, and the clean token follows from that clean state.  The agent clock ``t`` counts
agent actions only (``<bkspc>`` and clean tokens, not noise); discount weights are ``γ^t``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100  # as in objectives.base (not imported: objectives import this module)

NEVER = 2**62  # death index of a node that is never deleted
MASK_ALIGN = 16  # row stride (elements) of the additive mask, see additive_ancestor_mask

__all__ = [
    "NEVER",
    "DataRows",
    "NoiseSampler",
    "Tape",
    "additive_ancestor_mask",
    "ancestor_mask",
    "augment_batch",
    "collate_tapes",
    "concat_tapes",
    "data_tapes",
    "model_tape",
    "pack_tapes",
]


@dataclass
class Tape:
    """One trajectory laid out for a single forward pass (all tensors int64 on CPU unless noted).

    Nodes (length L): ``tokens`` fed, ``depth`` (= position id), ``death`` (see module doc),
    ``bk_allowed`` (bool: the node's state holds a deletable token), ``clean_target`` (the clean
    data token typed from this node, −100 if none; drives the MLE term).
    Agent actions (length A), in trajectory order: ``act_state`` (node whose state takes the
    action), ``act_token`` (action id, ``<bkspc>`` included), ``act_next`` (node of the next
    state, −1 = terminal: V after it is 0), ``act_time`` (agent clock t), ``act_slot`` (index
    among the actions taken from the same node).
    """

    tokens: torch.Tensor
    depth: torch.Tensor
    death: torch.Tensor
    bk_allowed: torch.Tensor
    clean_target: torch.Tensor
    act_state: torch.Tensor
    act_token: torch.Tensor
    act_next: torch.Tensor
    act_time: torch.Tensor
    act_slot: torch.Tensor
    is_model: bool = False
    age: int = -1
    num_noise: int = 0
    #: Per-action ages when several trajectories share the row (see :func:`pack_tapes`).
    act_age: torch.Tensor | None = None
    num_trajectories: int = 1

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_actions(self) -> int:
        return int(self.act_state.shape[0])


class NoiseSampler:
    """Draws the wrong tokens of the backspace augmentation.

    ``mode="random"``: uniform over the original vocabulary (ids below ``vocab_size``, i.e. below
    ``<bkspc>``) minus ``exclude`` (special tokens) minus the true token.
    ``mode="unigram"``: a token of the current micro-batch drawn uniformly among its positions
    (the batch unigram distribution), re-drawn (up to 4 draws) where it equals the true token, then
    from ``random``.
    """

    MODES = ("random", "unigram")

    def __init__(self, vocab_size: int, exclude: Sequence[int] = (), mode: str = "random") -> None:
        if mode not in self.MODES:
            raise ValueError(f"noise_token must be one of {self.MODES}, got {mode!r}")
        keep = torch.ones(vocab_size, dtype=torch.bool)
        ex = torch.tensor([i for i in exclude if 0 <= i < vocab_size], dtype=torch.long)
        keep[ex] = False
        self.candidates = keep.nonzero().squeeze(1)
        if self.candidates.numel() < 2:
            raise ValueError("the noise vocabulary needs at least two tokens")
        self.mode = mode

    def random(self, true_tokens: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # Uniform over candidates \ {true}: draw among the first M−1 candidates and send a hit on
        # the true token to the last candidate (exact when the true token is a candidate).
        m = self.candidates.numel()
        u = torch.randint(0, m - 1, true_tokens.shape, generator=generator)
        w = self.candidates[u]
        return torch.where(w == true_tokens, self.candidates[m - 1], w)

    def __call__(self, true_tokens: torch.Tensor, pool: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        w = self.random(true_tokens, generator)
        if self.mode == "unigram" and pool.numel() > 0:
            # Up to 4 draws from the batch; the first that differs from the true token wins.
            u = pool[torch.randint(0, pool.numel(), (*true_tokens.shape, 4), generator=generator)]
            ok = u != true_tokens[..., None]
            first = u.gather(-1, ok.long().argmax(-1, keepdim=True)).squeeze(-1)
            w = torch.where(ok.any(-1), first, w)
        return w


@dataclass
class DataRows:
    """Backspace-augmented data rows of one batch, already laid out as (B, T) / (B, A) arrays.

    What :func:`data_tapes` returns row by row, built for the whole batch at once with tensor ops
    (no Python loop over tokens).  (B, T) node arrays, padded beyond ``length``: ``tokens``
    (0; :func:`collate_tapes` writes its ``pad_token_id``), ``depth`` (0), ``death`` (padding node k: k + 1, visible to itself only),
    ``bk_allowed`` (False), ``labels`` (``labels[p + 1]`` = clean data token typed from node p,
    −100 elsewhere); (B, A) action arrays, padded beyond ``num_actions``: ``act_state`` (0),
    ``act_token`` (−1), ``act_next`` (−1); ``num_noise`` (B,).  The agent clock of action i is i,
    its slot 0 (a data node takes at most one action).
    """

    tokens: torch.Tensor
    depth: torch.Tensor
    death: torch.Tensor
    bk_allowed: torch.Tensor
    labels: torch.Tensor
    length: torch.Tensor
    act_state: torch.Tensor
    act_token: torch.Tensor
    act_next: torch.Tensor
    num_actions: torch.Tensor
    num_noise: torch.Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def tapes(self) -> list[Tape]:
        """One :class:`Tape` per row."""
        out = []
        for b in range(len(self)):
            n, a = int(self.length[b]), int(self.num_actions[b])
            clean = torch.full((n,), IGNORE_INDEX, dtype=torch.long)
            clean[: n - 1] = self.labels[b, 1:n]
            out.append(Tape(
                tokens=self.tokens[b, :n].clone(), depth=self.depth[b, :n].clone(), death=self.death[b, :n].clone(),
                bk_allowed=self.bk_allowed[b, :n].clone(), clean_target=clean,
                act_state=self.act_state[b, :a].clone(), act_token=self.act_token[b, :a].clone(),
                act_next=self.act_next[b, :a].clone(), act_time=torch.arange(a),
                act_slot=torch.zeros(a, dtype=torch.long), num_noise=int(self.num_noise[b]),
            ))
        return out


def augment_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    *,
    backspace_id: int,
    noise_rate: float = 0.0,
    noise: NoiseSampler | None = None,
    eos_token_id: int | None = None,
    terminal_mode: str = "eos",
    generator: torch.Generator | None = None,
    noise_positions: Sequence[dict[int, int]] | None = None,
) -> DataRows:
    """The rows of :func:`data_tapes` as one :class:`DataRows` (same arguments, same random draws).

    Random draws, per row in order: ``rand(n)`` for the noise positions, then (only if the row
    got noise) the wrong tokens of every position from ``noise``; everything else is batched.
    """
    if terminal_mode not in ("eos", "none"):
        raise ValueError(f"terminal_mode must be 'eos' or 'none', got {terminal_mode!r}")
    eos = eos_token_id if terminal_mode == "eos" else None
    ids = input_ids.detach().cpu().long()
    keep = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
    lab = ids.masked_fill(~keep, IGNORE_INDEX) if labels is None else labels.detach().cpu().long()
    pool = ids[keep & (lab != IGNORE_INDEX)]
    if noise_rate > 0 and noise is None and noise_positions is None:
        raise ValueError("noise_rate > 0 needs a NoiseSampler")
    bsz = ids.shape[0]
    n = keep.sum(1)
    empty = (n == 0).nonzero()
    if empty.numel():
        raise ValueError(f"row {int(empty[0])} of the batch has no tokens")
    # Compact every row to its kept positions (left or right padding): (B, W) with W = max n.
    width = int(n.max())
    j = torch.arange(width)
    inside = j[None, :] < n[:, None]
    if bool(keep.all()):
        x, y = ids, lab
    else:
        rb, rj = keep.nonzero(as_tuple=True)
        rank = keep.long().cumsum(1)[rb, rj] - 1
        x = torch.zeros((bsz, width), dtype=torch.long)
        y = torch.full((bsz, width), IGNORE_INDEX, dtype=torch.long)
        x[rb, rank], y[rb, rank] = ids[rb, rj], lab[rb, rj]
    act = (y != IGNORE_INDEX) & inside
    act[:, 0] = False  # the first token has no prediction: it is context
    if not torch.equal(y[act], x[act]):
        raise ValueError("SequenceMatch needs labels equal to input_ids wherever they are not -100")

    # Noise draws, row by row (the draw order of the per-row construction).
    is_noise = torch.zeros((bsz, width), dtype=torch.bool)
    wrong = torch.zeros((bsz, width), dtype=torch.long)
    if noise_positions is not None:
        for b, forced in enumerate(noise_positions):
            for jj, w in forced.items():
                if not (0 <= jj < int(n[b])) or not bool(act[b, jj]) or int(w) == int(x[b, jj]):
                    raise ValueError(f"noise at {jj}: not a clean action, or the wrong token equals the true one")
                is_noise[b, jj], wrong[b, jj] = True, int(w)
    elif noise_rate > 0:
        for b in range(bsz):
            nb = int(n[b])
            row = (torch.rand(nb, generator=generator) < noise_rate) & act[b, :nb]
            if bool(row.any()):
                is_noise[b, :nb] = row
                wrong[b, :nb] = noise(x[b, :nb], pool, generator)

    # Tape layout: clean token j sits at c[j]; a noise node before it at c[j] − 1.
    inc = is_noise.long()
    c = j[None, :] + inc.cumsum(1)
    num_noise = inc.sum(1)
    length = n + num_noise
    t = int(length.max())
    tokens = torch.zeros((bsz, t), dtype=torch.long)
    depth = torch.zeros((bsz, t), dtype=torch.long)
    death = torch.arange(1, t + 1).repeat(bsz, 1)  # padding: visible to itself only
    cb, cj = inside.nonzero(as_tuple=True)
    cpos = c[cb, cj]
    tokens[cb, cpos], depth[cb, cpos], death[cb, cpos] = x[cb, cj], cj, NEVER
    nb_, nj = is_noise.nonzero(as_tuple=True)
    npos = c[nb_, nj] - 1
    tokens[nb_, npos], depth[nb_, npos], death[nb_, npos] = wrong[nb_, nj], nj, npos + 1  # deleted right after it
    first = torch.where(act.any(1), act.long().argmax(1), n)  # first clean action: the end of the context
    bk_allowed = (depth >= first[:, None]) & (torch.arange(t)[None, :] < length[:, None])
    c_prev = torch.cat([torch.zeros((bsz, 1), dtype=torch.long), c[:, :-1]], 1)  # clean state before token j
    ab, aj = act.nonzero(as_tuple=True)
    lab_out = torch.full((bsz, t), IGNORE_INDEX, dtype=torch.long)
    lab_out[ab, c_prev[ab, aj] + 1] = x[ab, aj]

    # Agent actions in trajectory order: for each clean j, an optional <bkspc> (noise node → the
    # clean state of j−1), then the clean token (clean state of j−1 → that of j).
    cnt = act.long() + inc
    before = cnt.cumsum(1) - cnt
    num_actions = cnt.sum(1)
    a = max(int(num_actions.max()), 1)
    act_state = torch.zeros((bsz, a), dtype=torch.long)
    act_token = torch.full((bsz, a), -1, dtype=torch.long)
    act_next = torch.full((bsz, a), -1, dtype=torch.long)
    bi = before[nb_, nj]
    act_state[nb_, bi], act_token[nb_, bi], act_next[nb_, bi] = npos, backspace_id, c_prev[nb_, nj]
    ci = before[ab, aj] + inc[ab, aj]
    nxt = c[ab, aj]
    if eos is not None:
        nxt = torch.where(x[ab, aj] == eos, torch.full_like(nxt, -1), nxt)
    act_state[ab, ci], act_token[ab, ci], act_next[ab, ci] = c_prev[ab, aj], x[ab, aj], nxt
    return DataRows(
        tokens=tokens, depth=depth, death=death, bk_allowed=bk_allowed, labels=lab_out, length=length,
        act_state=act_state, act_token=act_token, act_next=act_next, num_actions=num_actions, num_noise=num_noise,
    )


def data_tapes(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    *,
    backspace_id: int,
    noise_rate: float = 0.0,
    noise: NoiseSampler | None = None,
    eos_token_id: int | None = None,
    terminal_mode: str = "eos",
    generator: torch.Generator | None = None,
    noise_positions: Sequence[dict[int, int]] | None = None,
) -> list[Tape]:
    """Tapes of a collated data batch, with backspace augmentation.

    Row ``b`` keeps its positions with ``attention_mask == 1`` (left or right padding).  Clean
    data actions are the positions ``j ≥ 1`` with ``labels[j] != −100`` (they must equal
    ``input_ids[j]``); the tokens before the first one are the protected context.  Positions
    with label −100 after it are forced tokens: on the tape, not actions.

    Noise: each clean action independently gets a wrong token + ``<bkspc>`` before it with
    probability ``noise_rate`` (tokens from ``noise``).  ``noise_positions`` (tests, analysis)
    overrides the draw: per row, ``{j: wrong_token}``.

    ``terminal_mode="eos"``: a clean action equal to ``eos_token_id`` ends an episode (V after
    it is 0); ``"none"``: every window is cut from a longer text and bootstraps with V of its
    last state.

    Built batched by :func:`augment_batch` (which :func:`collate_tapes` also takes directly).
    """
    return augment_batch(
        input_ids, labels, attention_mask, backspace_id=backspace_id, noise_rate=noise_rate, noise=noise,
        eos_token_id=eos_token_id, terminal_mode=terminal_mode, generator=generator, noise_positions=noise_positions,
    ).tapes()


def model_tape(
    prompt: Sequence[int], actions: Sequence[int], backspace_id: int, terminal: bool = False, age: int = -1
) -> Tape:
    """Tape of a sampled trajectory: ``prompt`` (protected) then ``actions`` (tokens and ``<bkspc>``).

    ``terminal``: the last action ended the episode (EOS), so V after it is 0; otherwise the
    trajectory was cut (length or action cap) and bootstraps with V of its final state.
    """
    p = len(prompt)
    if p == 0:
        raise ValueError("a trajectory needs at least one prompt token")
    tokens, depth = [int(t) for t in prompt], list(range(p))
    death = [NEVER] * p
    stack = list(range(p))
    slots = [0] * p
    st, nx, sl = [], [], []
    for a in actions:
        s = stack[-1]
        st.append(s)
        sl.append(slots[s])
        slots[s] += 1
        if a == backspace_id:
            if len(stack) <= p:
                raise ValueError("a backspace deletes into the protected prompt")
            death[stack.pop()] = len(tokens)
        else:
            stack.append(len(tokens))
            tokens.append(int(a))
            depth.append(len(stack) - 1)
            death.append(NEVER)
            slots.append(0)
        nx.append(stack[-1])
    if terminal and nx:
        if actions[-1] == backspace_id:
            raise ValueError("a terminal trajectory must end with a token (EOS), not a backspace")
        nx[-1] = -1
    length = len(tokens)
    a = len(st)
    t = _long
    return Tape(
        tokens=t(tokens), depth=t(depth), death=t(death),
        bk_allowed=torch.arange(length) >= p, clean_target=torch.full((length,), IGNORE_INDEX, dtype=torch.long),
        act_state=t(st), act_token=t([int(x) for x in actions]), act_next=t(nx), act_time=torch.arange(a),
        act_slot=t(sl), is_model=True, age=age,
    )


def concat_tapes(tapes: Sequence[Tape]) -> Tape:
    """Several trajectories in one row: each sees only its own nodes.

    Every node still alive at the end of a trajectory is "deleted" where the next trajectory
    starts (``death`` = that index), so with ``allowed[q, k] = (k ≤ q) & (q < death[k])`` later
    trajectories never see earlier ones (and earlier ones never see later nodes, k > q).  Depths,
    clocks and action slots stay per trajectory; node indices are offset.
    """
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "tokens", "depth", "death", "bk_allowed", "clean_target", "act_state", "act_token", "act_next", "act_time",
        "act_slot", "act_age")}
    offset = 0
    for i, tp in enumerate(tapes):
        end = offset + len(tp)
        alive_until = NEVER if i == len(tapes) - 1 else end
        parts["tokens"].append(tp.tokens)
        parts["depth"].append(tp.depth)
        parts["death"].append(torch.where(tp.death >= NEVER, torch.full_like(tp.death, alive_until), tp.death + offset))
        parts["bk_allowed"].append(tp.bk_allowed)
        parts["clean_target"].append(tp.clean_target)
        parts["act_state"].append(tp.act_state + offset)
        parts["act_token"].append(tp.act_token)
        parts["act_next"].append(torch.where(tp.act_next >= 0, tp.act_next + offset, tp.act_next))
        parts["act_time"].append(tp.act_time)
        parts["act_slot"].append(tp.act_slot)
        parts["act_age"].append(tp.act_age if tp.act_age is not None else torch.full((tp.num_actions,), tp.age))
        offset = end
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return Tape(
        **cat, is_model=all(tp.is_model for tp in tapes), age=max(tp.age for tp in tapes),
        num_noise=sum(tp.num_noise for tp in tapes), num_trajectories=sum(tp.num_trajectories for tp in tapes),
    )


def pack_tapes(tapes: Sequence[Tape], capacity: int) -> list[Tape]:
    """Pack short trajectories into rows of at most ``capacity`` nodes (first-fit decreasing).

    Model trajectories (prompt + continuation) are much shorter than data windows; one per row
    would pad every one of them to the window length.  A trajectory longer than ``capacity``
    gets a row of its own.  Deterministic: ties keep the input order.
    """
    order = sorted(range(len(tapes)), key=lambda i: (-len(tapes[i]), i))
    bins: list[list[int]] = []
    sizes: list[int] = []
    for i in order:
        n = len(tapes[i])
        for j, size in enumerate(sizes):
            if size + n <= capacity:
                bins[j].append(i)
                sizes[j] += n
                break
        else:
            bins.append([i])
            sizes.append(n)
    return [tapes[b[0]] if len(b) == 1 else concat_tapes([tapes[i] for i in b]) for b in bins]


def _long(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)


def ancestor_mask(death: torch.Tensor) -> torch.Tensor:
    """Boolean (B, T, T) mask, ``[b, q, k]`` True iff node k is in the state of node q."""
    t = death.shape[-1]
    q = torch.arange(t, device=death.device)
    return (q[None, :] <= q[:, None])[None] & (q[None, :, None] < death[:, None, :])


def additive_ancestor_mask(
    death: torch.Tensor, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """(B, 1, T, T) additive form of :func:`ancestor_mask` (0 = visible, dtype-min = hidden).

    Built where the model runs from the CPU ``death`` (B, T) without any (B, T, T) temporary:
    one causal (T, T) template copied into every row (one write pass), then only the columns of
    nodes that die inside the window (``death < T``: deleted noise, padding, earlier packed
    trajectories) are rewritten, each as "visible for k ≤ q < death[k]".  Columns of nodes that
    never die are exactly causal.  The indices are computed on the host, so nothing here waits
    for the device.  Each (T, T) row block is laid out with a row stride rounded up to
    ``MASK_ALIGN`` elements (a view of a slightly wider buffer: same values, aligned rows).
    """
    death = death.cpu()
    b, t = death.shape
    neg = torch.finfo(dtype).min
    dev = torch.device("cpu") if device is None else torch.device(device)
    causal = torch.full((t, t), neg, dtype=dtype, device=dev).triu_(1)  # 0 on and below the diagonal
    # Rows start at multiples of MASK_ALIGN elements (the view drops the unused tail of each row):
    # SDPA's memory-efficient kernel otherwise pads a copy of the mask in every layer.
    stride = -(-t // MASK_ALIGN) * MASK_ALIGN
    mask = torch.empty((b, 1, t, stride), dtype=dtype, device=dev)[..., :t]
    mask.copy_(causal)
    dying = death < t
    if bool(dying.any()):
        bi, ki = dying.nonzero(as_tuple=True)
        lo, hi = ki, death[bi, ki]  # column k is visible to rows lo ≤ q < hi
        if dev.type != "cpu":
            bi, lo, hi = (x.to(dev, non_blocking=True) for x in (bi, lo, hi))
        q = torch.arange(t, device=dev)
        visible = (q[None, :] >= lo[:, None]) & (q[None, :] < hi[:, None])
        cols = torch.where(visible, torch.zeros((), dtype=dtype, device=dev), torch.full((), neg, dtype=dtype, device=dev))
        mask[bi, 0, :, lo] = cols
    return mask


def collate_tapes(
    tapes: Sequence[Tape],
    *,
    gamma: float,
    pad_token_id: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    data: DataRows | None = None,
    pad_to_multiple_of: int = 1,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stack tapes into ``(model_inputs, loss_inputs)`` for one forward pass.

    ``data`` (from :func:`augment_batch`): data rows already laid out, placed first, before
    ``tapes`` — the same result as passing ``data.tapes()`` first in ``tapes``, without a Python
    loop over its rows.

    ``pad_to_multiple_of``: the node length T is rounded up to a multiple of it with padding
    nodes (which see only themselves and are seen by nobody, so the loss is unchanged).  The
    augmented length otherwise changes with every draw of noise; rounding it leaves a handful of
    shapes (fewer ``torch.compile`` recompiles and per-shape kernel choices) and tensor-core
    friendly sizes, the reason for ``pad_to_multiple_of`` in transformers' data collators.

    model_inputs: ``input_ids`` (B, T), ``position_ids`` = depth (B, T), ``attention_mask``
    (B, 1, T, T) additive in ``dtype`` (0 = visible, dtype-min = hidden).  Padding nodes see
    only themselves (never a fully masked row) and nobody sees them.

    loss_inputs: ``labels`` (B, T) with ``shift_labels(labels)[p]`` = clean data token typed
    from node p (−100 elsewhere, so the base class counts exactly the clean targets);
    per-node ``sm_actions`` (B, T, K) action ids (−1 = none) and ``sm_bk_allowed`` (B, T);
    per-action ``sm_state``, ``sm_slot``, ``sm_next`` (−1 terminal), ``sm_weight`` = γ^t (fp32),
    ``sm_action_mask`` (B, A), ``sm_age`` (B, A) (optimizer steps since the action's trajectory
    was sampled, −1 for data); per-row ``sm_is_model`` (B,) and ``sm_num_trajectories`` (B,).

    Everything is built on the host and sent with one non-blocking copy per tensor; the (B, 1, T, T)
    mask is built on ``device`` (:func:`additive_ancestor_mask`).
    """
    bd = 0 if data is None else len(data)
    if not tapes and not bd:
        raise ValueError("no trajectories to collate")
    b = bd + len(tapes)
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be ≥ 1, got {pad_to_multiple_of}")
    t = max([len(tp) for tp in tapes] + ([int(data.tokens.shape[1])] if bd else []))
    t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    k = max([int(tp.act_slot.max()) + 1 for tp in tapes if tp.num_actions] or [1])
    a = max([tp.num_actions for tp in tapes] + [1] + ([int(data.act_state.shape[1])] if bd else []))
    input_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((b, t), dtype=torch.long)
    death = torch.arange(1, t + 1).repeat(b, 1)  # padding: visible to itself only
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    bk_allowed = torch.zeros((b, t), dtype=torch.bool)
    sm_actions = torch.full((b, t, k), -1, dtype=torch.long)
    state = torch.zeros((b, a), dtype=torch.long)
    slot = torch.zeros((b, a), dtype=torch.long)
    nxt = torch.full((b, a), -1, dtype=torch.long)
    time = torch.zeros((b, a), dtype=torch.long)
    amask = torch.zeros((b, a), dtype=torch.bool)
    age = torch.full((b, a), -1, dtype=torch.long)
    if bd:
        td, ad = data.tokens.shape[1], data.act_state.shape[1]
        node = torch.arange(td)[None, :] < data.length[:, None]
        input_ids[:bd, :td] = torch.where(node, data.tokens, pad_token_id)
        position_ids[:bd, :td], death[:bd, :td] = data.depth, data.death
        bk_allowed[:bd, :td], labels[:bd, :td] = data.bk_allowed, data.labels
        amask[:bd, :ad] = torch.arange(ad)[None, :] < data.num_actions[:, None]
        state[:bd, :ad], nxt[:bd, :ad] = data.act_state, data.act_next
        time[:bd, :ad] = torch.arange(ad)
        rb, ri = amask[:bd].nonzero(as_tuple=True)
        sm_actions[rb, data.act_state[rb, ri], 0] = data.act_token[rb, ri]
    for i, tp in enumerate(tapes, start=bd):
        n, m = len(tp), tp.num_actions
        input_ids[i, :n], position_ids[i, :n], death[i, :n] = tp.tokens, tp.depth, tp.death
        bk_allowed[i, :n] = tp.bk_allowed
        has = (tp.clean_target != IGNORE_INDEX).nonzero().squeeze(1)
        labels[i, has + 1] = tp.clean_target[has]
        sm_actions[i, tp.act_state, tp.act_slot] = tp.act_token
        state[i, :m], slot[i, :m], nxt[i, :m], time[i, :m] = tp.act_state, tp.act_slot, tp.act_next, tp.act_time
        amask[i, :m] = True
        age[i, :m] = tp.act_age if tp.act_age is not None else tp.age
    # γ^t from a table of γ^0 … γ^(a−1) (clocks never exceed a row's action count).
    table = torch.pow(torch.tensor(float(gamma), dtype=torch.float64), torch.arange(a, dtype=torch.float64))
    weight = torch.where(amask, table[time], torch.zeros((), dtype=torch.float64)).float()
    mask = additive_ancestor_mask(death, dtype, device)
    is_model = torch.tensor([False] * bd + [tp.is_model for tp in tapes], dtype=torch.bool)
    num_traj = torch.tensor([1] * bd + [tp.num_trajectories for tp in tapes], dtype=torch.long)
    model_inputs = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask}
    loss_inputs = {
        "labels": labels,
        "sm_actions": sm_actions,
        "sm_bk_allowed": bk_allowed,
        "sm_state": state,
        "sm_slot": slot,
        "sm_next": nxt,
        "sm_weight": weight,
        "sm_action_mask": amask,
        "sm_is_model": is_model,
        "sm_age": age,
        "sm_num_trajectories": num_traj,
    }
    if device is not None:
        model_inputs = {key: v.to(device, non_blocking=True) for key, v in model_inputs.items()}
        loss_inputs = {key: v.to(device, non_blocking=True) for key, v in loss_inputs.items()}
    return model_inputs, loss_inputs
