"""Eval prompts for open-ended generation, built from raw eval-split documents (``docs/evaluation.md``).

For each document, in order: drop empty lines and heading lines (WikiText ``= Title =`` /
``= = Section = =``, Markdown ``# Title``), join what is left with single spaces, split on
whitespace; skip it if it has fewer than ``prompt_words + continuation_words`` words; otherwise
the prefix is its first ``prompt_words`` words and the reference continuation the next
``continuation_words``. The first ``num_prompts`` such pairs are kept. Deterministic, no sampling.

Words are re-joined with single spaces (line breaks and runs of spaces inside a document are not
kept), so prefix + " " + reference is exactly the human text the generated one is compared with.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Prompt", "build_prompts", "is_heading"]

_WIKITEXT_HEADING = re.compile(r"^\s*=+\s.*\s=+\s*$|^\s*=+[^=]+=+\s*$")
_MARKDOWN_HEADING = re.compile(r"^\s{0,3}#{1,6}\s")


@dataclass(frozen=True)
class Prompt:
    """One eval example: the prompt prefix and the human continuation that followed it."""

    prefix: str
    reference: str

    @property
    def human_text(self) -> str:
        """prefix + reference continuation (MAUVE's p)."""
        return f"{self.prefix} {self.reference}"

    def with_continuation(self, continuation: str) -> str:
        """prefix + a generated continuation (MAUVE's q), with one space between them if it has none."""
        if not continuation or continuation[0].isspace():
            return (self.prefix + continuation).rstrip()
        return f"{self.prefix} {continuation}".rstrip()


def is_heading(line: str) -> bool:
    """A WikiText section heading (``= Title =``, ``= = Sub = =``) or a Markdown heading (``# Title``)."""
    return bool(_WIKITEXT_HEADING.match(line) or _MARKDOWN_HEADING.match(line))


def build_prompts(
    documents: Iterable[str],
    prompt_words: int = 20,
    continuation_words: int = 80,
    num_prompts: int | None = None,
) -> list[Prompt]:
    """Prefix / reference-continuation pairs from ``documents`` (see the module docstring)."""
    if prompt_words < 1 or continuation_words < 1:
        raise ValueError(
            f"prompt_words and continuation_words must be positive, got {prompt_words} and {continuation_words}"
        )
    need = prompt_words + continuation_words
    prompts: list[Prompt] = []
    for doc in documents:
        if num_prompts is not None and len(prompts) >= num_prompts:
            break
        if not isinstance(doc, str):
            raise TypeError(f"eval documents must be strings, got {type(doc).__name__}")
        lines = [ln for ln in doc.splitlines() if ln.strip() and not is_heading(ln)]
        words = " ".join(lines).split()
        if len(words) < need:
            continue
        prompts.append(Prompt(" ".join(words[:prompt_words]), " ".join(words[prompt_words:need])))
    return prompts
