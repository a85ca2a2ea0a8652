"""Known first-order Markov languages (MixCE's synthetic setting) and their datasets.

A language over ``V`` word tokens ``w0 … w{V-1}`` plus ``<eos>`` is a first-order Markov
chain.  The token ids used everywhere (chain, tokenizer, models) are::

    0 … V-1   words w0 … w{V-1}
    V         <eos>   (absorbing: P(<eos> | <eos>) = 1; a sequence that reaches it ends)
    V+1       <bos>   (context of the first word; its "row" is the start distribution)
    V+2       <pad>   (never emitted)

so a model for the language has ``V + 3`` output tokens (:attr:`MarkovChain.model_vocab_size`).

Generation (:func:`generate_chain`), per row:

* word rows are distributions over the ``V + 1`` tokens words + ``<eos>``; the start row is a
  distribution over the ``V`` words (no empty sequences);
* a fraction ``zero_fraction`` (default 0.5) of the row's entries is set to exactly 0
  (``round(zero_fraction · n)`` entries chosen uniformly, at least one entry always kept);
* the kept entries are drawn from Dirichlet(``alpha`` = 0.5).  This is the same law as
  "draw the full row from Dirichlet(0.5), zero the chosen entries, renormalise", by the
  aggregation property of the Dirichlet, but never renormalises an all-zero row;
* ``eos_prob=None`` (default) treats ``<eos>`` as an ordinary column of the Dirichlet, so
  sequence length is part of what is learned; a number instead fixes
  ``P(<eos> | w) = eos_prob`` in every word row (the remaining mass is spread over words as
  above), which pins the mean length near ``1 / eos_prob`` for large vocabularies.

Sampling (:meth:`MarkovChain.sample`): ``x1 ~ start``, then ``x_{t+1} ~ P(· | x_t)`` until
``<eos>`` is drawn or the sequence holds ``max_length`` tokens (``<eos>`` included).  A
sequence cut by ``max_length`` has no ``<eos>``; cutting at a fixed length does not bias the
transitions that are observed, so the training data stays a sample of the chain.

Datasets (:func:`write_dataset`) are what the normal training pipeline reads: jsonl files with
a ``text`` field of space-separated tokens, ``"<bos> w12 w7 w3 <eos>"`` (``<eos>`` written out
when the chain emitted it, absent from a sequence cut at ``max_length``), a WordLevel tokenizer
saved with ``save_pretrained`` (no post-processing: ``tokenizer(text).input_ids`` is exactly
``[<bos>, w12, w7, w3, <eos>]`` with or without special tokens), and the chain itself
(``chain.npz``) for the exact metrics.  The ``<bos>`` is in the text because the first word is
predicted from it (the start row); the pipeline must not append another ``<eos>``
(``data.add_eos: false``) — if it did, the extra ``<eos> → <eos>`` transition is the one the
absorbing row predicts anyway.  One sequence per example (``data.packing: false``) is MixCE's
setting; packed blocks also work (each sequence starts with its ``<bos>``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "MarkovChain",
    "generate_chain",
    "load_chain",
    "load_sequences",
    "make_tokenizer",
    "sequences_to_texts",
    "write_dataset",
]

#: Sampling works on this many sequences at a time (bounds the (chunk × V) CDF lookup).
_SAMPLE_CHUNK = 4096


@dataclass
class MarkovChain:
    """A known language: word transitions, start distribution and the token layout.

    Attributes:
        transition: ``(V+1, V+1)`` row-stochastic matrix over words + ``<eos>``; row ``V``
            (``<eos>``) is absorbing.
        start: ``(V+1,)`` distribution of the first token (``start[<eos>] = 0``).
    """

    transition: np.ndarray
    start: np.ndarray

    def __post_init__(self) -> None:
        self.transition = np.asarray(self.transition, dtype=np.float64)
        self.start = np.asarray(self.start, dtype=np.float64)
        n = self.transition.shape[0]
        if self.transition.shape != (n, n) or self.start.shape != (n,):
            raise ValueError(f"transition must be square (got {self.transition.shape}) and start of length {n}")
        if n < 2:
            raise ValueError("a chain needs at least one word and <eos>")
        if not np.allclose(self.transition.sum(1), 1.0) or not np.isclose(self.start.sum(), 1.0):
            raise ValueError("rows of transition and start must each sum to 1")
        if (self.transition < 0).any() or (self.start < 0).any():
            raise ValueError("probabilities must be non-negative")
        if self.transition[self.eos_id, self.eos_id] != 1.0:
            raise ValueError("the <eos> row must be absorbing (P(<eos> | <eos>) = 1)")
        if self.start[self.eos_id] != 0.0:
            raise ValueError("the start distribution must not emit <eos> (no empty sequences)")

    # ------------------------------------------------------------------ layout
    @property
    def vocab_size(self) -> int:
        """Number of word tokens ``V`` (specials not counted)."""
        return self.transition.shape[0] - 1

    @property
    def eos_id(self) -> int:
        return self.vocab_size

    @property
    def bos_id(self) -> int:
        return self.vocab_size + 1

    @property
    def pad_id(self) -> int:
        return self.vocab_size + 2

    @property
    def model_vocab_size(self) -> int:
        """Output size of a model of this language: words, ``<eos>``, ``<bos>``, ``<pad>``."""
        return self.vocab_size + 3

    def token_strings(self) -> list[str]:
        """Token strings indexed by id."""
        return [f"w{i}" for i in range(self.vocab_size)] + ["<eos>", "<bos>", "<pad>"]

    @property
    def row_ids(self) -> np.ndarray:
        """Context tokens that have a learned next-token distribution: ``<bos>`` and every word.

        ``<eos>`` is left out: its row is absorbing by definition and a model trained on
        sequences that stop at ``<eos>`` never learns it.
        """
        return np.concatenate([[self.bos_id], np.arange(self.vocab_size)])

    def next_token_table(self) -> np.ndarray:
        """``P(next | context)`` over the model vocabulary, ``(V+3, V+3)``, indexed by context id.

        Rows: words and ``<eos>`` from :attr:`transition`, ``<bos>`` = :attr:`start`; the
        ``<pad>`` row is all zeros (not a context).  Columns ``<bos>`` and ``<pad>`` are 0.
        """
        n = self.vocab_size + 1
        table = np.zeros((self.model_vocab_size, self.model_vocab_size))
        table[:n, :n] = self.transition
        table[self.bos_id, :n] = self.start
        return table

    # ------------------------------------------------------------------ sampling
    def sample(self, num_sequences: int, max_length: int, seed: int | np.random.Generator = 0) -> list[np.ndarray]:
        """``num_sequences`` sequences of token ids (no ``<bos>``), each at most ``max_length`` long.

        Each sequence ends with ``<eos>`` unless it was cut at ``max_length``.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        rng = np.random.default_rng(seed)
        cdf = np.cumsum(self.transition, axis=1)
        cdf[:, -1] = 1.0  # exact top so that u in [0, 1) always finds a token
        start_cdf = np.cumsum(self.start)
        start_cdf[-1] = 1.0
        out: list[np.ndarray] = []
        for begin in range(0, num_sequences, _SAMPLE_CHUNK):
            n = min(_SAMPLE_CHUNK, num_sequences - begin)
            seqs = np.full((n, max_length), self.eos_id, dtype=np.int64)
            # argmax of (cdf > u) is the first token whose cumulative mass exceeds u; tokens of
            # probability 0 never are (their cdf equals the previous one).
            seqs[:, 0] = np.argmax(start_cdf[None, :] > rng.random(n)[:, None], axis=1)
            for t in range(1, max_length):
                u = rng.random(n)
                prev = seqs[:, t - 1]
                live = prev != self.eos_id
                if not live.any():
                    break
                seqs[live, t] = np.argmax(cdf[prev[live]] > u[live, None], axis=1)
            for row in seqs:
                ends = np.flatnonzero(row == self.eos_id)
                out.append(row[: ends[0] + 1].copy() if len(ends) else row.copy())
        return out

    def visit_counts(self, max_length: int) -> np.ndarray:
        """Expected number of next-token predictions made from each context, per sequence.

        Returns a ``(V+3,)`` vector indexed by context id: ``<bos>`` predicts once per
        sequence; word ``w`` predicts at every position ``t < max_length`` where ``x_t = w``
        (the last token of a cut sequence has no target).  Normalised over :attr:`row_ids`
        this is the per-token weighting of the forward/reverse KL.
        """
        v = self.vocab_size
        counts = np.zeros(self.model_vocab_size)
        counts[self.bos_id] = 1.0
        mu = self.start.copy()  # distribution of x_t over words + <eos>, t = 1
        for _ in range(1, max_length):
            counts[:v] += mu[:v]
            mu = mu[:v] @ self.transition[:v]  # paths that already ended drop out
        return counts

    # ------------------------------------------------------------------ io
    def save(self, path: str | os.PathLike) -> None:
        np.savez(path, transition=self.transition, start=self.start)


def generate_chain(
    vocab_size: int,
    seed: int = 0,
    alpha: float = 0.5,
    zero_fraction: float = 0.5,
    eos_prob: float | None = None,
) -> MarkovChain:
    """A random language with ``vocab_size`` words (see the module docstring for the law)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if not 0.0 <= zero_fraction < 1.0:
        raise ValueError(f"zero_fraction must be in [0, 1), got {zero_fraction}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if eos_prob is not None and not 0.0 < eos_prob < 1.0:
        raise ValueError(f"eos_prob must be in (0, 1) or None, got {eos_prob}")
    rng = np.random.default_rng(seed)
    v = vocab_size

    def sparse_row(n: int) -> np.ndarray:
        keep = max(1, n - round(zero_fraction * n))
        idx = rng.choice(n, size=keep, replace=False)
        row = np.zeros(n)
        row[idx] = rng.dirichlet(np.full(keep, alpha)) if keep > 1 else 1.0
        return row

    transition = np.zeros((v + 1, v + 1))
    for i in range(v):
        if eos_prob is None:
            transition[i] = sparse_row(v + 1)
        else:
            transition[i, :v] = (1.0 - eos_prob) * sparse_row(v)
            transition[i, v] = eos_prob
    transition[v, v] = 1.0
    start = np.zeros(v + 1)
    start[:v] = sparse_row(v)
    # Renormalise away float rounding so the exact checks in MarkovChain hold.
    transition /= transition.sum(1, keepdims=True)
    start /= start.sum()
    return MarkovChain(transition, start)


def load_chain(path: str | os.PathLike) -> MarkovChain:
    """Load a chain saved by :meth:`MarkovChain.save` (a ``.npz`` file or a dataset folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "chain.npz"
    with np.load(path) as data:
        return MarkovChain(data["transition"], data["start"])


# ---------------------------------------------------------------------- datasets
def sequences_to_texts(chain: MarkovChain, sequences: list[np.ndarray]) -> list[str]:
    """Space-separated token strings with the ``<bos>`` written out (``"<bos> w3 w0 <eos>"``)."""
    names = chain.token_strings()
    return [" ".join(["<bos>", *(names[i] for i in seq)]) for seq in sequences]


def make_tokenizer(chain: MarkovChain):
    """A ``PreTrainedTokenizerFast`` with the chain's ids: one id per whitespace-separated token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(chain.token_strings())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", model_max_length=1 << 20
    )


def write_dataset(
    chain: MarkovChain,
    out_dir: str | os.PathLike,
    num_train: int = 50_000,
    num_validation: int = 5_000,
    max_length: int = 100,
    seed: int = 0,
) -> dict:
    """Write a dataset of the language that the normal pipeline trains on.

    Creates ``train.jsonl`` and ``validation.jsonl`` (``{"text": "<bos> w12 w7 <eos>"}`` per line),
    ``tokenizer/`` (``AutoTokenizer.from_pretrained`` loads it), ``chain.npz`` and
    ``meta.json``.  Train and validation use independent streams of ``seed``.  Returns the
    metadata.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_rng, valid_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    splits = {"train": chain.sample(num_train, max_length, train_rng),
              "validation": chain.sample(num_validation, max_length, valid_rng)}
    for split, seqs in splits.items():
        with open(out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": text}) + "\n" for text in sequences_to_texts(chain, seqs))
    make_tokenizer(chain).save_pretrained(out / "tokenizer")
    chain.save(out / "chain.npz")
    meta = {
        "vocab_size": chain.vocab_size,
        "model_vocab_size": chain.model_vocab_size,
        "eos_id": chain.eos_id,
        "bos_id": chain.bos_id,
        "pad_id": chain.pad_id,
        "max_length": max_length,
        "seed": seed,
        "num_train": num_train,
        "num_validation": num_validation,
        "train_tokens": int(sum(len(s) for s in splits["train"])),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_sequences(path: str | os.PathLike, chain: MarkovChain) -> list[np.ndarray]:
    """Read a jsonl written by :func:`write_dataset` back into id arrays (leading ``<bos>`` dropped)."""
    vocab = {tok: i for i, tok in enumerate(chain.token_strings())}
    seqs = []
    with open(path) as f:
        for line in f:
            if line.strip():
                words = json.loads(line)["text"].split()
                if words and words[0] == "<bos>":
                    words = words[1:]
                seqs.append(np.array([vocab[w] for w in words], dtype=np.int64))
    return seqs
