"""Options of the generation metrics run at every evaluation (the ``eval:`` section of a config)."""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Keys a decoding setting of ``eval.decodings`` may set.
DECODING_KEYS = ("name", "temperature", "top_k", "top_p")
_NAME_OK = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class Decoding:
    """One decoding setting of the generation metrics. ``name`` prefixes its logged keys
    (``eval_<name>_mauve``); the main setting (``eval.temperature/top_k/top_p``) has ``name == ""``
    and logs unprefixed keys (``eval_mauve``)."""

    name: str
    temperature: float
    top_k: int
    top_p: float

    def key(self, metric: str) -> str:
        """The metric's key under this decoding: ``mauve`` or ``top_p0.95_mauve``."""
        return metric_key(self.name, metric)


def metric_key(decoding_name: str, metric: str) -> str:
    """A metric's key under the decoding setting named ``decoding_name`` (``""`` = the main one):
    ``mauve`` or ``top_p0.95_mauve``. For code that has the name only (e.g. from a results file)."""
    return f"{decoding_name}_{metric}" if decoding_name else metric


def decoding_name(setting: dict, main: Decoding) -> str:
    """The default name of a decoding setting: what differs from the main one, e.g. ``top_p0.95``,
    ``top_k50``, ``temp0.7`` (joined with ``_`` when several keys differ)."""
    parts = []
    if "temperature" in setting and setting["temperature"] != main.temperature:
        parts.append(f"temp{setting['temperature']:g}")
    if "top_k" in setting and setting["top_k"] != main.top_k:
        parts.append(f"top_k{setting['top_k']}")
    if "top_p" in setting and setting["top_p"] != main.top_p:
        parts.append(f"top_p{setting['top_p']:g}")
    return "_".join(parts)


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
    #: More decoding settings, each evaluated like the main one (same prompts and seeds) and logged
    #: under its own name: e.g. ``[{top_p: 0.95}]`` adds ``eval_top_p0.95_mauve``, ``..._rep_2``, ...
    #: next to the pure-sampling ``eval_mauve``. Keys: ``temperature``, ``top_k``, ``top_p`` (unset =
    #: the main setting's) and ``name`` (default: built from what differs, e.g. ``top_p0.95``).
    decodings: tuple[dict, ...] = ()
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

    def decoding_settings(self) -> list[Decoding]:
        """The main decoding setting (name ``""``) followed by ``decodings``, with defaults filled in."""
        main = Decoding("", self.temperature, self.top_k, self.top_p)
        out = [main]
        for d in self.decodings:
            d = dict(d)
            out.append(Decoding(
                str(d.get("name") or decoding_name(d, main)), float(d.get("temperature", main.temperature)),
                int(d.get("top_k", main.top_k)), float(d.get("top_p", main.top_p)),
            ))
        return out


def parse_decoding(spec: str) -> dict:
    """A command-line decoding setting: ``top_p=0.95`` or ``name=nucleus,top_p=0.95,temperature=0.9``
    → an ``eval.decodings`` entry (values read as YAML; checked by ``config.validate_eval``)."""
    from ..config import ConfigError, cli_value

    out = {}
    for part in spec.split(","):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--decodings {spec!r}: write KEY=VALUE[,KEY=VALUE], e.g. top_p=0.95")
        out[key.strip()] = cli_value(["eval", "decodings", key.strip()], value.strip())
    return out
