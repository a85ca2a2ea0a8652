"""Several decoding settings in one evaluation (``eval.decodings``): each logged under its own name."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import documents, tiny_gpt2, tiny_tokenizer

from emo_trainer.config import ConfigError, build_section, validate_eval
from emo_trainer.evaluation.callback import GenerationEvalCallback
from emo_trainer.evaluation.config import Decoding, EvalConfig
from emo_trainer.evaluation.generation import generate_continuations
from emo_trainer.evaluation.metrics.repetition import repetition_metrics
from emo_trainer.evaluation.prompts import build_prompts

FAST = {"prompt_words": 8, "continuation_words": 24, "max_new_tokens": 8, "batch_size": 32,
        "mauve_featurizer": "hashing", "mauve_kmeans_num_redo": 1, "mauve_kmeans_max_iter": 50}


def test_decoding_settings_names_and_defaults():
    c = EvalConfig(top_p=1.0, decodings=({"top_p": 0.95}, {"top_k": 50, "temperature": 0.7}, {"name": "greedy", "top_k": 1}))
    assert c.decoding_settings() == [Decoding("", 1.0, 0, 1.0), Decoding("top_p0.95", 1.0, 0, 0.95),
                                     Decoding("temp0.7_top_k50", 0.7, 50, 1.0), Decoding("greedy", 1.0, 1, 1.0)]
    assert Decoding("top_p0.95", 1, 0, 0.95).key("mauve") == "top_p0.95_mauve"
    assert Decoding("", 1, 0, 1).key("mauve") == "mauve"


@pytest.mark.parametrize("decodings, message", [
    ([{"top_q": 0.9}], "eval.decodings[0]: unknown key 'top_q' (did you mean top_p, top_k?)"),
    ([{"top_p": 1.5}], "eval.decodings[0].top_p: must be in (0, 1], got 1.5"),
    ([{"top_p": 1.0}], "is the main decoding setting"),
    ([{"top_p": 0.9}, {"top_p": 0.9}], "two settings are named 'top_p0.9'"),
    ([{"name": "a b", "top_p": 0.9}], "must be letters, digits"),
    ([3], "eval.decodings: expected a mapping, got 3"),
    ([{"top_k": "many"}], "eval.decodings[0].top_k: expected an integer"),
])
def test_bad_decodings_are_one_line_errors(decodings, message):
    with pytest.raises(ConfigError) as e:
        validate_eval(build_section(EvalConfig, {"decodings": decodings}, "eval"))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_each_decoding_logged_under_its_name_and_equal_to_a_run_with_that_setting():
    docs = documents(80)
    tok = tiny_tokenizer(docs[:40])
    model = tiny_gpt2(tok).eval()
    prompts = build_prompts(docs, 8, 24, 60)
    cfg = EvalConfig(**FAST, seeds=(0, 1), decodings=({"top_p": 0.5},))
    cb = GenerationEvalCallback(prompts, cfg, tok)
    out = cb.generation_metrics(model)
    for key in ("mauve", "rep_2", "diversity", "mauve_std"):
        assert key in out and f"top_p0.5_{key}" in out
    assert "top_p0.5_mauve_runtime" not in out and out["mauve_runtime"] > 0
    # the top-p texts are exactly what a main setting of top_p 0.5 samples with the same seed
    alone = generate_continuations(model, tok, [p.prefix for p in prompts], EvalConfig(**FAST, top_p=0.5), seed=1)
    assert cb.last_continuations[("top_p0.5", 1)] == alone
    assert cb.last_continuations[("", 1)] != alone
    per_seed = [repetition_metrics(cb.last_continuations[("top_p0.5", s)])["rep_2"] for s in (0, 1)]
    assert out["top_p0.5_rep_2"] == pytest.approx(sum(per_seed) / 2)
