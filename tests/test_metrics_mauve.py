"""MAUVE: sample guards, featurizers (hashing, tiny GPT-2 and BERT saved to tmp_path), cache, evaluate module."""

import random
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import documents, tiny_gpt2, tiny_tokenizer

from emo_trainer.evaluation import metrics
from emo_trainer.evaluation.metrics.mauve import (
    FeatureCache,
    HashingFeaturizer,
    MauveSampleError,
    TransformersFeaturizer,
    check_sample_count,
    compute_mauve,
    featurize,
    get_featurizer,
    mauve_score,
)

KMEANS = {"kmeans_num_redo": 1, "kmeans_max_iter": 100}  # fast; the score itself is what is tested


def _gibberish(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "iota", "kappa", "lambda", "omicron", "sigma"]
    return [" ".join(rng.choice(vocab) for _ in range(40)) for _ in range(n)]


def test_guards():
    with pytest.raises(MauveSampleError, match="at least 50"):
        check_sample_count(49, 1000)
    with pytest.warns(UserWarning, match="noisy"):
        assert check_sample_count(50, 60) == 50
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_sample_count(500, 700) == 500
    with pytest.raises(MauveSampleError):
        compute_mauve(np.zeros((10, 4)), np.zeros((10, 4)))
    with pytest.raises(MauveSampleError):  # refused before any featurization
        mauve_score(["a"] * 49, ["b"] * 49)


def test_identical_close_to_one_different_lower_on_features():
    rng = np.random.default_rng(0)
    p = rng.standard_normal((100, 16)).astype(np.float32)
    with pytest.warns(UserWarning):
        same = compute_mauve(p, p.copy(), **KMEANS)
    far = p + np.float32(3.0) * np.eye(16, dtype=np.float32)[0]  # shift along one axis, well apart after l2-norm
    with pytest.warns(UserWarning):
        diff = compute_mauve(p, far, **KMEANS)
    assert same["mauve"] > 0.99 and same["mauve_num_samples"] == 100
    assert diff["mauve"] < 0.5


def test_hashing_featurizer_is_deterministic_and_discriminates():
    docs = documents(120)
    a, b = HashingFeaturizer(), HashingFeaturizer()
    fa = a(docs[:5] + [""])
    assert fa.shape == (6, 256) and fa.dtype == np.float32
    np.testing.assert_array_equal(fa, b(docs[:5] + [""]))
    assert not fa[-1].any()  # the empty text has no n-gram
    with pytest.warns(UserWarning):
        same = mauve_score(docs[:60], docs[:60], "hashing", **KMEANS)
    with pytest.warns(UserWarning):
        other_half = mauve_score(docs[:60], docs[60:120], "hashing", **KMEANS)
    with pytest.warns(UserWarning):
        unrelated = mauve_score(docs[:60], _gibberish(60), "hashing", **KMEANS)
    assert same["mauve"] > 0.99
    assert unrelated["mauve"] < 0.3 < other_half["mauve"]


class CountingFeaturizer:
    def __init__(self):
        self.inner, self.calls = HashingFeaturizer(), 0
        self.name = "counting-" + self.inner.name

    def __call__(self, texts):
        self.calls += 1
        return self.inner(texts)


def test_reference_features_are_cached():
    cache, feat = FeatureCache(), CountingFeaturizer()
    refs = documents(3)
    first = featurize(feat, refs, cache)
    second = featurize(feat, refs, cache)
    assert feat.calls == 1 and second is first and len(cache) == 1
    featurize(feat, refs[:2], cache)  # different texts -> different key
    assert feat.calls == 2
    assert get_featurizer(feat) is feat


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("featurizer-gpt2")
    tok = tiny_tokenizer(documents(40))
    tiny_gpt2(tok, n_positions=128).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_causal_lm_featurizer_last_token(tiny_gpt2_dir):
    from transformers import AutoModel, AutoTokenizer

    texts = ["Anna walked to the old mill.", "Ben", "Clara found a key near the river and smiled at Ben."]
    feat = TransformersFeaturizer(str(tiny_gpt2_dir), max_text_length=64, batch_size=2)
    got = feat(texts)
    assert feat.pooling == "last" and got.shape == (3, 32)
    model, tok = AutoModel.from_pretrained(tiny_gpt2_dir).eval(), AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    for text, row in zip(texts, got):  # one text at a time, no padding: final hidden state of the last token
        with torch.no_grad():
            h = model(**tok(text, return_tensors="pt")).last_hidden_state[0, -1]
        np.testing.assert_allclose(row, h.numpy(), rtol=1e-4, atol=1e-5)
    # truncation to max_text_length tokens
    short = TransformersFeaturizer(str(tiny_gpt2_dir), max_text_length=3)
    ids = tok(texts[2])["input_ids"][:3]
    with torch.no_grad():
        h = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    np.testing.assert_allclose(short([texts[2]])[0], h.numpy(), rtol=1e-4, atol=1e-5)
    assert np.isfinite(feat([""])).all()  # an empty text is featurized as one special token


def test_encoder_featurizer_mean_pooled(tmp_path):
    from transformers import AutoModel, BertConfig, BertModel

    tok = tiny_tokenizer(documents(40))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    texts = ["Anna walked to the old mill.", "Ben smiled."]
    feat = TransformersFeaturizer(str(tmp_path), batch_size=2)
    got = feat(texts)
    assert feat.pooling == "mean"
    model = AutoModel.from_pretrained(tmp_path).eval()
    for text, row in zip(texts, got):
        with torch.no_grad():
            h = model(**tok(text, return_tensors="pt")).last_hidden_state[0].mean(0)
        np.testing.assert_allclose(row, h.numpy(), rtol=1e-4, atol=1e-5)


def test_mauve_with_tiny_gpt2_featurizer(tiny_gpt2_dir):
    # An untrained 1-layer model is a weak featurizer and 60 samples are few: the margin is modest
    # (about 0.72 here, deterministic with these seeds) but the ordering is what matters.
    docs = documents(60)
    with pytest.warns(UserWarning):
        same = mauve_score(docs, docs, str(tiny_gpt2_dir), max_text_length=128, **KMEANS)
    with pytest.warns(UserWarning):
        unrelated = mauve_score(docs, _gibberish(60), str(tiny_gpt2_dir), max_text_length=128, **KMEANS)
    assert same["mauve"] > 0.99 and same["mauve_num_samples"] == 60
    assert unrelated["mauve"] < 0.85


def test_missing_featurizer_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="hashing"):
        TransformersFeaturizer(str(tmp_path / "nope"))(["x"])


def test_evaluate_module_offline():
    import evaluate

    docs = documents(60)
    mauve = evaluate.load(metrics.module_path("mauve"))
    with pytest.warns(UserWarning):
        out = mauve.compute(predictions=docs, references=docs, featurizer="hashing")
    assert out["mauve"] > 0.99 and out["mauve_num_samples"] == 60
    combined = evaluate.combine([metrics.load("repetition"), metrics.load("mauve")])
    with pytest.warns(UserWarning):
        both = combined.compute(predictions=docs, references=docs)
    assert {"mauve", "mauve_num_samples", "rep_2", "diversity"} <= set(both)
    with pytest.raises(MauveSampleError):
        metrics.load("mauve").compute(predictions=docs[:10], references=docs[:10])
