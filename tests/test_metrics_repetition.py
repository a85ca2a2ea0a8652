"""Repetition / diversity metrics against hand-computed values (arithmetic in the comments)."""

import math

import evaluate
import pytest

from emo_trainer.evaluation import metrics
from emo_trainer.evaluation.metrics.repetition import (
    distinct_n,
    diversity,
    mean_length,
    ngrams,
    rep_n,
    repetition_metrics,
    seq_rep_n,
)

CAT = "the cat sat on the mat the cat sat"  # 9 tokens: the cat sat on the mat the cat sat


def test_ngrams():
    assert ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert ngrams(["a", "b"], 3) == []
    with pytest.raises(ValueError):
        ngrams(["a"], 0)


def test_single_text_by_hand():
    # 2-grams (8): the-cat cat-sat sat-on on-the the-mat mat-the the-cat cat-sat -> 6 distinct
    assert rep_n([CAT], 2) == pytest.approx(1 - 6 / 8)
    # 3-grams (7): the-cat-sat cat-sat-on sat-on-the on-the-mat the-mat-the mat-the-cat the-cat-sat -> 6 distinct
    assert rep_n([CAT], 3) == pytest.approx(1 - 6 / 7)
    # 4-grams (6): all distinct
    assert rep_n([CAT], 4) == pytest.approx(0.0)
    # diversity = (1 - 2/8)(1 - 1/7)(1 - 0) = 0.75 * 6/7
    assert diversity([CAT]) == pytest.approx(0.75 * 6 / 7)
    assert seq_rep_n([CAT], 4) == pytest.approx(0.0)
    # unigrams: 9 tokens, distinct {the, cat, sat, on, mat} = 5
    assert distinct_n([CAT], 1) == pytest.approx(5 / 9)
    assert distinct_n([CAT], 2) == pytest.approx(6 / 8)
    assert mean_length([CAT]) == 9


def test_corpus_level_sums_vs_union():
    texts = ["a b a b", "a b c"]
    # rep-2: per-text distinct 2-grams {ab, ba} (2 of 3) + {ab, bc} (2 of 2) -> 1 - 4/5
    assert rep_n(texts, 2) == pytest.approx(0.2)
    # distinct-2 uses the union over texts: {ab, ba, bc} = 3 of 5
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    # 3-grams: {aba, bab} (2 of 2) + {abc} (1 of 1) -> 0
    assert rep_n(texts, 3) == pytest.approx(0.0)
    # 4-grams: only "a b a b" has one (abab, 1 of 1); "a b c" is too short and adds nothing
    assert rep_n(texts, 4) == pytest.approx(0.0)
    assert seq_rep_n(texts, 4) == pytest.approx(0.0)
    # unigrams: {a, b, c} over 7 tokens
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert mean_length(texts) == pytest.approx(3.5)


def test_seq_rep_is_a_mean_of_ratios_rep_is_a_ratio_of_sums():
    texts = ["x y z w x y z w x", "p q r s t"]
    # text 1, 4-grams (6): xyzw yzwx zwxy wxyz xyzw yzwx -> 4 distinct -> 1 - 4/6 = 1/3
    # text 2, 4-grams (2): pqrs qrst -> 2 distinct -> 0
    assert seq_rep_n(texts, 4) == pytest.approx((1 / 3 + 0) / 2)
    # rep-4 = 1 - (4 + 2) / (6 + 2)
    assert rep_n(texts, 4) == pytest.approx(0.25)


def test_fully_repetitive_text():
    # "a a a a a": 2-grams aa x4 -> 1 distinct: rep-2 = 3/4; 3-grams aaa x3 -> 2/3; 4-grams aaaa x2 -> 1/2
    t = ["a a a a a"]
    out = repetition_metrics(t)
    assert out["rep_2"] == pytest.approx(3 / 4)
    assert out["rep_3"] == pytest.approx(2 / 3)
    assert out["rep_4"] == pytest.approx(1 / 2)
    assert out["diversity"] == pytest.approx((1 / 4) * (1 / 3) * (1 / 2))
    assert out["seq_rep_4"] == pytest.approx(1 / 2)
    assert out["distinct_1"] == pytest.approx(1 / 5)


@pytest.mark.parametrize("texts", [[], [""], ["", "   \n"]])
def test_no_ngrams_at_all_scores_worst(texts):
    out = repetition_metrics(texts)
    assert out == {
        "rep_2": 1.0, "rep_3": 1.0, "rep_4": 1.0, "diversity": 0.0, "seq_rep_4": 1.0,
        "distinct_1": 0.0, "distinct_2": 0.0, "mean_length": 0.0,
    }


def test_texts_shorter_than_n():
    # "a" has no 2-gram: only "b c" counts for rep-2 (1 distinct of 1) -> 0
    assert rep_n(["a", "b c"], 2) == pytest.approx(0.0)
    assert distinct_n(["a", "b c"], 1) == pytest.approx(3 / 3)
    # one word: unigrams exist, nothing longer
    out = repetition_metrics(["word"])
    assert out["distinct_1"] == 1.0 and out["distinct_2"] == 0.0 and out["rep_2"] == 1.0
    assert out["seq_rep_4"] == 1.0 and out["mean_length"] == 1.0
    # a short text among long ones is left out of seq-rep-4's mean (not counted as 0)
    assert seq_rep_n(["a a a a a", "b"], 4) == pytest.approx(1 / 2)


def test_whitespace_tokenisation():
    assert repetition_metrics(["  a \n b\tc  "]) == repetition_metrics(["a b c"])
    with pytest.raises(TypeError):
        rep_n("a single string", 2)
    assert all(math.isfinite(v) for v in repetition_metrics(["x"]).values())


def test_evaluate_module_matches_functions():
    texts = ["a b a b", "a b c", CAT]
    expected = repetition_metrics(texts)
    direct = metrics.load("repetition")
    assert isinstance(direct, evaluate.EvaluationModule)
    assert direct.name == "repetition"
    assert direct.compute(predictions=texts) == pytest.approx(expected)
    loaded = evaluate.load(metrics.module_path("repetition"))  # evaluate's own loader, offline
    assert loaded.compute(predictions=texts) == pytest.approx(expected)
    # incremental use, then compute
    direct.add_batch(predictions=texts[:2])
    direct.add_batch(predictions=texts[2:])
    assert direct.compute() == pytest.approx(expected)


def test_unknown_metric_name():
    with pytest.raises(ValueError, match="available"):
        metrics.load("bleu")
