"""``evaluate`` metric: MAUVE between human texts (references) and model texts (predictions).

Offline with the dependency-free featurizer, or with any local ``transformers`` model::

    mauve = emo_trainer.metrics.load("mauve")
    mauve.compute(predictions=model_texts, references=human_texts, featurizer="hashing")
    mauve.compute(predictions=..., references=..., featurizer="/models/gpt2-large")

Texts should be whole texts (prefix + continuation). Fewer than 50 pairs raise, fewer than 500
warn; the sample count is returned with the score. Details: ``emo_trainer/evaluation/metrics/mauve.py``.
"""

import datasets
import evaluate

from emo_trainer.evaluation.metrics.mauve import FeatureCache, get_featurizer, mauve_score

_DESCRIPTION = """\
MAUVE (Pillutla et al., 2021) between the distribution of human texts p (references) and model
texts q (predictions), via mauve-text on features of a fixed featurizer (a causal LM's last-token
final hidden state, an encoder's mean-pooled final hidden states, or "hashing": hashed word
1/2-gram counts under a fixed random projection). k-means with a fixed seed, scaling factor 5.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): model texts (q).
    references (`list` of `str`): human texts (p).
    featurizer (`str`): "hashing" (default), a hub id or a local model path.
    max_text_length (`int`): tokens (words for "hashing") kept per text, default 256.
    featurizer_batch_size (`int`): default 16.
    pooling (`str`): "auto" (default), "last" or "mean".
    device (`str`): "auto" (default), "cpu", "cuda:0", ...
    scaling_factor (`float`): default 5.
    kmeans_seed (`int`): default 25.
    num_buckets (`int` or "auto"): k-means clusters, default "auto" (n / 10).
Returns:
    mauve (`float` in [0, 1], higher is closer), mauve_num_samples (`int`).
"""

_CITATION = """\
@inproceedings{pillutla2021mauve, title={MAUVE: Measuring the Gap Between Neural Text and Human Text using
  Divergence Frontiers}, author={Pillutla, Krishna and Swayamdipta, Swabha and Zellers, Rowan and Thickstun, John
  and Welleck, Sean and Choi, Yejin and Harchaoui, Zaid}, booktitle={NeurIPS}, year={2021}}
"""


class Mauve(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        featurizer="hashing",
        max_text_length=256,
        featurizer_batch_size=16,
        pooling="auto",
        device="auto",
        scaling_factor=5.0,
        kmeans_seed=25,
        num_buckets="auto",
    ):
        # A loaded featurizer and the reference features are kept on the instance across calls.
        if not hasattr(self, "_featurizers"):
            self._featurizers, self._cache = {}, FeatureCache()
        key = (featurizer, max_text_length, featurizer_batch_size, pooling, device)
        if key not in self._featurizers:
            self._featurizers[key] = get_featurizer(featurizer, max_text_length, featurizer_batch_size, pooling,
                                                    device)
        return mauve_score(
            references,
            predictions,
            self._featurizers[key],
            cache=self._cache,
            scaling_factor=scaling_factor,
            kmeans_seed=kmeans_seed,
            num_buckets=num_buckets,
        )
