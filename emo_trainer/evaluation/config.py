"""Options of the generation metrics run at every evaluation (the ``eval:`` section of a config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    """Generation-based evaluation, as in ``docs/evaluation.md``.

    Perplexity (plain CE, token-weighted) is always computed; these keys control the
    sampled continuations and the metrics on them.
    """

    #: Run the generation metrics (MAUVE, repetition, diversity) at each evaluation.
    generation: bool = True
    #: How many eval-split documents become prompts (taken in order after filtering).
    num_prompts: int = 500
    #: Words (whitespace) of a document used as the prompt prefix.
    prompt_words: int = 20
    #: Words of the reference continuation that follows the prefix.
    continuation_words: int = 80
    #: Tokens sampled per continuation.
    max_new_tokens: int = 128
    #: Sampling: pure ancestral sampling by default (temperature 1, top_k 0, top_p 1).
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    #: Prompts per generation batch (left padded, KV cache).
    batch_size: int = 32
    #: Sampling seed(s); several seeds give mean ± std.
    seeds: tuple[int, ...] = (0,)
    #: MAUVE on/off. Needs at least 50 prompts (refused below), warns under 500.
    mauve: bool = True
    #: Fixed featurizer for MAUVE: hub id or local path (never the model being trained),
    #: or "hashing" for a dependency-free n-gram featurizer (offline quickstart).
    mauve_featurizer: str = "gpt2-large"
    #: Featurizer tokens kept per text (words for "hashing").
    mauve_max_text_length: int = 256
    #: MAUVE's scaling constant c (both papers: 5).
    mauve_scaling_factor: float = 5.0
    #: Seed of MAUVE's PCA / k-means quantisation (mauve-text's default, 25).
    mauve_kmeans_seed: int = 25
    #: k-means restarts and iterations (mauve-text's defaults; lower them to save time).
    mauve_kmeans_num_redo: int = 5
    mauve_kmeans_max_iter: int = 500
    #: Feature pooling: "auto" (causal LM -> last token's final hidden state, encoder -> mean), "last", "mean".
    mauve_pooling: str = "auto"
    #: Device of the featurizer: "auto" (this process's GPU if any, else CPU), "cpu", "cuda:0", ...
    mauve_device: str = "auto"
    #: Texts per featurizer forward pass.
    featurizer_batch_size: int = 16
