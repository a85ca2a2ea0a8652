"""``evaluate`` metric: token-weighted perplexity from per-sequence (or per-batch) NLL sums.

    ppl = emo_trainer.metrics.load("perplexity")
    for batch in loader:
        nll, n = emo_trainer.metrics.perplexity.sequence_nll(model(**batch).logits, batch["labels"])
        ppl.add_batch(nll_sum=nll.tolist(), num_tokens=n.tolist())
    ppl.compute()   # {"perplexity": exp(Σ nll / Σ tokens), "nll": Σ nll / Σ tokens, "num_tokens": Σ tokens}

Token-weighted over everything added, not a mean of batch means. See
``emo_trainer/evaluation/metrics/perplexity.py``.
"""

import datasets
import evaluate

from emo_trainer.evaluation.metrics.perplexity import perplexity_from_totals

_DESCRIPTION = """\
Perplexity = exp(Σ NLL / Σ target tokens) over everything added (token-weighted), from the summed
next-token negative log-likelihood (nats) and the number of target tokens of each sequence or batch.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll_sum (`list` of `float`): summed NLL in nats of each sequence (or batch).
    num_tokens (`list` of `int`): number of target tokens of each sequence (or batch).
Returns:
    perplexity (`float`), nll (`float`, mean NLL per token), num_tokens (`int`).
Examples:
    >>> ppl = emo_trainer.metrics.load("perplexity")
    >>> ppl.compute(nll_sum=[2.0, 4.0], num_tokens=[1, 5])["nll"]  # (2 + 4) / 6 tokens
    1.0
"""


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll_sum": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll_sum, num_tokens):
        total_nll, total_tokens = float(sum(nll_sum)), int(sum(num_tokens))
        return {
            "perplexity": perplexity_from_totals(total_nll, total_tokens),
            "nll": total_nll / total_tokens,
            "num_tokens": total_tokens,
        }
