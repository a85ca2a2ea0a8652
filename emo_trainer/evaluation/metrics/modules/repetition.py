"""``evaluate`` measurement: repetition and diversity of texts (rep-n, diversity, seq-rep-4, distinct-n).

Offline, like any local module::

    import evaluate
    rep = evaluate.load("/path/to/emo_trainer/evaluation/metrics/modules/repetition.py")
    rep.compute(predictions=["the cat sat on the mat", "a b a b"])

or ``emo_trainer.metrics.load("repetition")``. Definitions and corner cases:
``emo_trainer/evaluation/metrics/repetition.py``.
"""

import datasets
import evaluate

from emo_trainer.evaluation.metrics.repetition import repetition_metrics

_DESCRIPTION = """\
Repetition and diversity of a set of texts on whitespace tokens: rep-n (n = 2, 3, 4) = 1 − Σ distinct
n-grams per text / Σ n-grams per text; diversity = Π (1 − rep-n) (SimCTG); seq-rep-4 = mean per-text
1 − distinct 4-grams / 4-grams (Welleck et al. 2019); distinct-n (n = 1, 2) = distinct n-grams over
all texts / n-grams over all texts; mean_length = mean whitespace tokens per text. A set with no
n-gram at all gets the worst values (rep-n 1, diversity 0, distinct-n 0, seq-rep-4 1).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the texts (e.g. generated continuations, without the prompt).
Returns:
    rep_2, rep_3, rep_4, diversity, seq_rep_4, distinct_1, distinct_2, mean_length (floats).
Examples:
    >>> rep = emo_trainer.metrics.load("repetition")
    >>> rep.compute(predictions=["a b a b"])["rep_2"]  # 2-grams ab, ba, ab: 1 - 2/3
    0.33333333333333337
"""

_CITATION = """\
@inproceedings{welleck2020neural, title={Neural Text Generation with Unlikelihood Training},
  author={Welleck, Sean and Kulikov, Ilia and Roller, Stephen and Dinan, Emily and Cho, Kyunghyun and Weston, Jason},
  booktitle={ICLR}, year={2020}}
@inproceedings{su2022contrastive, title={A Contrastive Framework for Neural Text Generation},
  author={Su, Yixuan and Lan, Tian and Wang, Yan and Yogatama, Dani and Kong, Lingpeng and Collier, Nigel},
  booktitle={NeurIPS}, year={2022}}
"""


class Repetition(evaluate.Measurement):
    def _info(self):
        return evaluate.MeasurementInfo(
            module_type="measurement",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions):
        return repetition_metrics(predictions)
