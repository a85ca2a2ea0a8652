"""MAUVE (Pillutla et al. 2021) between human and model texts, on features of a fixed featurizer.

p = prefix + reference continuation, q = prefix + generated continuation; both are embedded by a
featurizer that is *not* the model being trained, and ``mauve.compute_mauve(p_features=...,
q_features=...)`` (package ``mauve-text``) quantises them with PCA + k-means (fixed seed) and
integrates the divergence frontier with scaling factor c = 5.

Featurizers (``eval.mauve_featurizer``):

* a hub id or local path loaded with ``transformers.AutoModel``: a causal LM gives the final
  hidden state of the last token (what ``mauve-text`` does with ``gpt2-large``); an encoder gives
  the attention-masked mean of its final hidden states. Texts are truncated to
  ``max_text_length`` tokens.
* ``"hashing"``: no model, no download — lower-cased whitespace word 1- and 2-grams hashed
  (CRC-32) into 4096 buckets, log(1 + count), then a fixed Gaussian random projection to 256
  dimensions (seed 0). Deterministic on every machine; coarse (it sees word choice and local
  order, not meaning), so use it for offline smoke runs such as the quickstart, not for papers.

Sample counts: MAUVE is biased upward and noisy with few samples, so fewer than
:data:`MIN_SAMPLES` per side is refused (:class:`MauveSampleError`), fewer than
:data:`RECOMMENDED_SAMPLES` warns, and the count is returned with the score.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import warnings
import zlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from ...errors import MauveSampleError

__all__ = [
    "MIN_SAMPLES",
    "RECOMMENDED_SAMPLES",
    "FeatureCache",
    "Featurizer",
    "HashingFeaturizer",
    "MauveSampleError",
    "TransformersFeaturizer",
    "check_sample_count",
    "compute_mauve",
    "featurize",
    "get_featurizer",
    "mauve_score",
]

MIN_SAMPLES = 50
RECOMMENDED_SAMPLES = 500




@runtime_checkable
class Featurizer(Protocol):
    """Anything that maps texts to a fixed-size float32 matrix, one row per text."""

    #: Identifies the features (model, pooling, truncation); part of the cache key.
    name: str

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


def check_sample_count(num_p: int, num_q: int) -> int:
    """Apply the spec's guards; returns the number of samples per side (the smaller one)."""
    n = min(num_p, num_q)
    if n < MIN_SAMPLES:
        raise MauveSampleError(
            f"MAUVE needs at least {MIN_SAMPLES} texts per side, got {num_p} (p) and {num_q} (q): below that "
            "the score is mostly noise. Use more eval prompts (eval.num_prompts and enough eval documents) "
            "or turn MAUVE off (eval.mauve: false)."
        )
    if n < RECOMMENDED_SAMPLES:
        warnings.warn(
            f"MAUVE on {n} samples per side is biased upward and noisy (use >= {RECOMMENDED_SAMPLES} to compare "
            "runs, >= 1000 with several seeds for final numbers); the sample count is reported with the score.",
            UserWarning,
            stacklevel=2,
        )
    return n


# --------------------------------------------------------------------------------------------------
# Featurizers
# --------------------------------------------------------------------------------------------------


class HashingFeaturizer:
    """Hashed word 1/2-gram counts → fixed random projection (dependency-free, deterministic)."""

    def __init__(self, dim: int = 256, num_buckets: int = 4096, max_words: int = 256, seed: int = 0):
        self.dim, self.num_buckets, self.max_words, self.seed = dim, num_buckets, max_words, seed
        self.name = f"hashing(dim={dim},buckets={num_buckets},ngrams=1-2,max_words={max_words},seed={seed})"
        # Gaussian projection scaled so that squared norms are preserved in expectation.
        rng = np.random.default_rng(seed)
        self._projection = (rng.standard_normal((num_buckets, dim)) / math.sqrt(dim)).astype(np.float32)

    def _bucket(self, gram: str) -> int:
        return zlib.crc32(gram.encode("utf-8")) % self.num_buckets

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        counts = np.zeros((len(texts), self.num_buckets), dtype=np.float32)
        for row, text in enumerate(texts):
            words = text.lower().split()[: self.max_words]
            grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
            for g in grams:
                counts[row, self._bucket(g)] += 1.0
        return np.log1p(counts) @ self._projection


class TransformersFeaturizer:
    """Final hidden states of a fixed ``transformers`` model (loaded lazily, frozen, in eval mode).

    ``pooling``: ``"last"`` (last non-padding token; the MAUVE default for causal LMs), ``"mean"``
    (mask-aware mean; for encoders) or ``"auto"`` (``"last"`` when the config is a causal LM).
    ``device``: ``"auto"`` (this process's accelerator if any, else CPU), or any torch device string.
    """

    def __init__(
        self,
        name_or_path: str,
        max_text_length: int = 256,
        batch_size: int = 16,
        pooling: str = "auto",
        device: str = "auto",
    ):
        if pooling not in ("auto", "last", "mean"):
            raise ValueError(f"mauve pooling must be 'auto', 'last' or 'mean', got {pooling!r}")
        self.name_or_path, self.max_text_length, self.batch_size = name_or_path, max_text_length, batch_size
        self._pooling, self._device = pooling, device
        self._model = self._tokenizer = None
        self.name = f"transformers({name_or_path},pooling={pooling},max_len={max_text_length})"

    def _load(self) -> None:
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(self.name_or_path)
            self._tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
            model = AutoModel.from_pretrained(self.name_or_path, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise OSError(
                f"could not load the MAUVE featurizer '{self.name_or_path}': {str(e).splitlines()[0]}. Set "
                "eval.mauve_featurizer to a local model directory, or to 'hashing' for an offline featurizer."
            ) from None
        if self._pooling == "auto":
            archs = config.architectures or []
            causal = getattr(config, "is_decoder", False) or any(
                a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs
            )
            self._pooling = "last" if causal else "mean"
        self.name = f"transformers({self.name_or_path},pooling={self._pooling},max_len={self.max_text_length})"
        if self._device == "auto":
            from accelerate import PartialState

            device = PartialState().device if torch.cuda.is_available() else torch.device("cpu")
        else:
            device = torch.device(self._device)
        self._model = model.to(device).eval().requires_grad_(False)

    @property
    def pooling(self) -> str:
        if self._model is None:
            self._load()
        return self._pooling

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if self._model is None:
            self._load()
        tok, model = self._tokenizer, self._model
        device = next(model.parameters()).device
        filler = next((t for t in (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) if t is not None), 0)
        ids = tok(list(texts), truncation=True, max_length=self.max_text_length)["input_ids"]
        # An empty text has no token to pool: it is featurized as a single end/begin-of-text token.
        ids = [x if len(x) else [filler] for x in ids]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # length-sorted batches pad less
        out = np.zeros((len(ids), model.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                lengths = torch.tensor([len(ids[i]) for i in idx])
                width = int(lengths.max())
                input_ids = torch.full((len(idx), width), filler, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):  # right padding: the last real token is at length - 1
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                    mask[row, : len(ids[i])] = 1
                hidden = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
                hidden = hidden.float().cpu()
                if self._pooling == "last":
                    feats = hidden[torch.arange(len(idx)), lengths - 1]
                else:
                    feats = (hidden * mask[..., None]).sum(1) / lengths[:, None]
                out[idx] = feats.numpy()
        return out


def get_featurizer(
    spec: str | Featurizer,
    max_text_length: int = 256,
    batch_size: int = 16,
    pooling: str = "auto",
    device: str = "auto",
) -> Featurizer:
    """``"hashing"`` → :class:`HashingFeaturizer`; a hub id or path → :class:`TransformersFeaturizer`;
    an object with ``name`` and ``__call__`` is returned as is."""
    if not isinstance(spec, str):
        if not isinstance(spec, Featurizer):
            raise TypeError(f"a featurizer needs a `name` and to be callable on a list of texts, got {spec!r}")
        return spec
    if spec == "hashing":
        return HashingFeaturizer(max_words=max_text_length)
    return TransformersFeaturizer(spec, max_text_length=max_text_length, batch_size=batch_size, pooling=pooling,
                                  device=device)


class FeatureCache:
    """Features of whole text lists, keyed by (featurizer name, texts): references are featurized once."""

    def __init__(self):
        self._store: dict[str, np.ndarray] = {}

    @staticmethod
    def key(featurizer: Featurizer, texts: Sequence[str]) -> str:
        h = hashlib.sha256(featurizer.name.encode())
        for t in texts:
            h.update(b"\x00" + t.encode("utf-8"))
        return h.hexdigest()

    def get(self, featurizer: Featurizer, texts: Sequence[str]) -> np.ndarray | None:
        return self._store.get(self.key(featurizer, texts))

    def put(self, featurizer: Featurizer, texts: Sequence[str], features: np.ndarray) -> None:
        self._store[self.key(featurizer, texts)] = features

    def __len__(self) -> int:
        return len(self._store)


def featurize(
    featurizer: Featurizer, texts: Sequence[str], cache: FeatureCache | None = None
) -> np.ndarray:
    """Features of ``texts``; sharded over accelerate processes and gathered; looked up in/stored to ``cache``."""
    from emo_trainer.evaluation.sharding import gather_in_order, process_info, shard_for_process

    texts = list(texts)
    if cache is not None and (hit := cache.get(featurizer, texts)) is not None:
        return hit
    if process_info()[1] == 1:
        feats = np.asarray(featurizer(texts), dtype=np.float32)
    else:
        local = np.asarray(featurizer(shard_for_process(texts)), dtype=np.float32)
        feats = np.stack(gather_in_order(list(local), len(texts))) if texts else local
    if cache is not None:
        cache.put(featurizer, texts, feats)
    return feats


# --------------------------------------------------------------------------------------------------
# Score
# --------------------------------------------------------------------------------------------------


def _mauve_of_features(p_features, q_features, scaling_factor, kmeans_seed, num_buckets, kmeans_num_redo,
                       kmeans_max_iter) -> float:
    import mauve

    out = mauve.compute_mauve(
        p_features=p_features,
        q_features=q_features,
        num_buckets=num_buckets,
        mauve_scaling_factor=scaling_factor,
        seed=kmeans_seed,
        kmeans_num_redo=kmeans_num_redo,
        kmeans_max_iter=kmeans_max_iter,
        verbose=False,
    )
    return float(out.mauve)


def compute_mauve(
    p_features: np.ndarray,
    q_features: np.ndarray,
    *,
    scaling_factor: float = 5.0,
    kmeans_seed: int = 25,
    num_buckets: int | str = "auto",
    kmeans_num_redo: int = 5,
    kmeans_max_iter: int = 500,
) -> dict[str, float]:
    """MAUVE of precomputed features (rows = texts), with the sample guards.

    Returns ``{"mauve": score, "mauve_num_samples": n}`` (n = samples per side; the smaller side).
    ``num_buckets="auto"`` is mauve-text's n / 10 clusters.
    """
    p_features, q_features = np.asarray(p_features), np.asarray(q_features)
    n = check_sample_count(len(p_features), len(q_features))
    score = _mauve_of_features(p_features, q_features, scaling_factor, kmeans_seed, num_buckets, kmeans_num_redo,
                               kmeans_max_iter)
    return {"mauve": score, "mauve_num_samples": n}


def mauve_score(
    p_texts: Sequence[str],
    q_texts: Sequence[str],
    featurizer: str | Featurizer = "hashing",
    *,
    max_text_length: int = 256,
    featurizer_batch_size: int = 16,
    pooling: str = "auto",
    device: str = "auto",
    cache: FeatureCache | None = None,
    scaling_factor: float = 5.0,
    kmeans_seed: int = 25,
    num_buckets: int | str = "auto",
    kmeans_num_redo: int = 5,
    kmeans_max_iter: int = 500,
) -> dict[str, float]:
    """Featurize human texts ``p_texts`` and model texts ``q_texts``, then compute MAUVE.

    The sample guards run first (before any featurization). ``cache`` (if given) is used for
    ``p_texts`` only: references repeat across evaluations, generations never do.
    """
    n = check_sample_count(len(p_texts), len(q_texts))
    feat = get_featurizer(featurizer, max_text_length, featurizer_batch_size, pooling, device)
    p = featurize(feat, p_texts, cache)
    q = featurize(feat, q_texts)
    score = _mauve_of_features(p, q, scaling_factor, kmeans_seed, num_buckets, kmeans_num_redo, kmeans_max_iter)
    return {"mauve": score, "mauve_num_samples": n}
