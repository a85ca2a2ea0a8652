"""Known-P lab: exact metrics on hand-computed chains, the generator, and two scientific checks.

All tests are CPU-tiny (a few seconds in total for the training ones).
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from emo_trainer.known_p import (
    BigramConfig,
    BigramLM,
    MarkovChain,
    context_free_table,
    contextual_metrics,
    evaluate_model,
    exact_metrics,
    generate_chain,
    load_chain,
    load_sequences,
    make_tokenizer,
    row_divergences,
    write_dataset,
)
from emo_trainer.known_p.metrics import REVERSE_KL_EPS, model_position_distributions
from emo_trainer.known_p.training import make_model, train_loop
from emo_trainer.objectives import available, get_objective

LN2, LN43 = math.log(2.0), math.log(4.0 / 3.0)


# ---------------------------------------------------------------------- hand-computed metrics
def test_row_divergences_hand_computed():
    # p = [1/2, 1/2, 0], q = [1/4, 1/2, 1/4]
    p = np.array([[0.5, 0.5, 0.0]])
    q = np.array([[0.25, 0.5, 0.25]])
    d = row_divergences(p, q)
    # KL(p‖q) = ½·ln(½/¼) + ½·ln(½/½) = ½ ln 2
    assert d["fkl"][0] == pytest.approx(0.5 * LN2, abs=1e-12)
    # m = [3/8, 1/2, 1/8];  KL(p‖m) = ½ ln(4/3);  KL(q‖m) = ¼ ln(2/3) + ¼ ln 2 = ¼ ln(4/3)
    # JS = ½·½ ln(4/3) + ½·¼ ln(4/3) = 3/8 ln(4/3)
    assert d["js"][0] == pytest.approx(3 / 8 * LN43, abs=1e-12)
    # the model puts q = 1/4 on the impossible third token
    assert d["impossible_mass"][0] == pytest.approx(0.25, abs=1e-12)
    # clipped reverse KL: ¼ ln(¼/½) + ½ ln 1 + ¼ ln(¼/ε)
    assert d["rkl"][0] == pytest.approx(0.25 * math.log(0.5) + 0.25 * math.log(0.25 / REVERSE_KL_EPS), abs=1e-12)
    # on the support: q̃ = [1/3, 2/3];  KL(q̃‖p) = ⅓ ln(⅔) + ⅔ ln(4/3)
    assert d["rkl_support"][0] == pytest.approx(math.log(2 / 3) / 3 + 2 / 3 * LN43, abs=1e-12)


def test_row_divergences_limits():
    p = np.array([[1.0, 0.0], [0.3, 0.7]])
    q = np.array([[0.0, 1.0], [0.3, 0.7]])
    d = row_divergences(p, q)
    assert d["js"][0] == pytest.approx(LN2)  # disjoint supports: the JS maximum, ln 2
    assert math.isinf(d["fkl"][0])  # q = 0 where p > 0
    for k in ("js", "fkl", "rkl", "rkl_support", "impossible_mass"):
        assert d[k][1] == pytest.approx(0.0, abs=1e-15)  # identical rows


def _hand_chain() -> MarkovChain:
    # Two words w0, w1 and <eos> (ids 0, 1, 2; <bos> = 3, <pad> = 4).
    # Every sequence starts with w0; w0 → w1 or <eos> with ½ each; w1 → w0.
    transition = np.array([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    return MarkovChain(transition, np.array([1.0, 0.0, 0.0]))


def test_visit_counts_hand_computed():
    chain = _hand_chain()
    # max_length 3: "w0 <eos>" (prob ½) predicts from <bos>, w0; "w0 w1 w0" (cut, prob ½) from <bos>, w0, w1.
    # Expected predictions per sequence: <bos> 1, w0 1, w1 ½.
    counts = chain.visit_counts(3)
    np.testing.assert_allclose(counts, [1.0, 0.5, 0.0, 1.0, 0.0], atol=1e-15)


def test_exact_metrics_hand_computed_chain():
    chain = _hand_chain()
    q = np.zeros((5, 5))  # Q(· | context) over [w0, w1, <eos>, <bos>, <pad>]
    q[chain.bos_id] = [1.0, 0.0, 0.0, 0.0, 0.0]  # exact start row: all divergences 0
    q[0] = [0.25, 0.5, 0.25, 0.0, 0.0]  # vs P(·|w0) = [0, ½, ½]: the first test's pair, permuted
    q[1] = [0.5, 0.0, 0.0, 0.5, 0.0]  # vs P(·|w1) = [1, 0, 0]: half the mass on <bos>
    # Row w1: KL(p‖q) = ln 2; m = [¾, 0, 0, ¼]; KL(p‖m) = ln(4/3), KL(q‖m) = ½ ln(2/3) + ½ ln 2 = ½ ln(4/3)
    #   → JS = ½ ln(4/3) + ¼ ln(4/3) = ¾ ln(4/3); impossible mass ½.
    # Visit weights (max_length 3) over rows [<bos>, w0, w1] = [1, 1, ½] / 2.5 = [0.4, 0.4, 0.2].
    m = exact_metrics(chain, q, max_length=3)
    assert m["js"] == pytest.approx((0 + 3 / 8 + 3 / 4) / 3 * LN43)  # uniform over the 3 rows = 3/8 ln(4/3)
    assert m["js_weighted"] == pytest.approx(0.4 * 3 / 8 * LN43 + 0.2 * 3 / 4 * LN43)  # = 0.3 ln(4/3)
    assert m["fkl"] == pytest.approx(0.4 * 0.5 * LN2 + 0.2 * LN2)  # = 0.4 ln 2
    assert m["impossible_mass"] == pytest.approx(0.4 * 0.25 + 0.2 * 0.5)  # = 0.2


def test_exact_metrics_of_the_truth_are_zero_and_extra_columns_are_renormalised():
    chain = generate_chain(6, seed=3)
    table = chain.next_token_table().copy()
    table[chain.pad_id] = 1.0 / chain.model_vocab_size  # the <pad> row is never read
    m = exact_metrics(chain, table, max_length=10)
    assert all(abs(v) < 1e-12 for k, v in m.items() if k != "rows")
    # An extra action column (SequenceMatch's <bkspc>) with 20% mass is renormalised away.
    with_bkspc = np.concatenate([0.8 * table, np.full((len(table), 1), 0.2)], axis=1)
    assert exact_metrics(chain, with_bkspc, max_length=10)["js"] == pytest.approx(0.0, abs=1e-12)


def test_contextual_metrics_agree_with_exact_for_a_bigram_model():
    chain = generate_chain(8, seed=0)
    torch.manual_seed(0)
    model = BigramLM(BigramConfig(vocab_size=chain.model_vocab_size, initializer_range=0.5)).eval()
    exact = exact_metrics(chain, context_free_table(model, chain), max_length=12)
    ctx, q = model_position_distributions(model, chain, chain.sample(3000, 12, seed=1))
    mc = contextual_metrics(chain, ctx, q)
    assert mc["rows"] == exact["rows"] == chain.vocab_size + 1
    # Per-row JS is the same at every occurrence of a row, so the uniform row mean is exact.
    assert mc["js"] == pytest.approx(exact["js"], rel=1e-6)  # (fp32 logits of two batch shapes)
    # Per-token quantities are Monte-Carlo estimates of the exact visit-weighted ones.
    for k in ("js_weighted", "fkl", "impossible_mass"):
        assert mc[k] == pytest.approx(exact[k], rel=0.05)


def test_mixce_fixed_point_hand_computed():
    from emo_trainer.known_p.metrics import mixce_fixed_point

    # p = [3/4, 1/4], η = ½:  q_k = ½ p_k / (Z − ½ p_k) with Σ q = 1
    #   ⇒ 3/8 (Z − 1/8) + 1/8 (Z − 3/8) = (Z − 3/8)(Z − 1/8) ⇒ Z² − Z + 9/64 = 0 ⇒ Z = ½ + √7/8
    #   ⇒ q = [3/(1 + √7), 1/(3 + √7)] ≈ [0.8229, 0.1771]: sharper than p.
    q = mixce_fixed_point(np.array([0.75, 0.25, 0.0]), 0.5)
    np.testing.assert_allclose(q, [3 / (1 + math.sqrt(7)), 1 / (3 + math.sqrt(7)), 0.0], atol=1e-12)
    np.testing.assert_allclose(mixce_fixed_point(np.array([0.2, 0.8]), 1.0), [0.2, 0.8])  # η = 1: MLE, q = p
    np.testing.assert_allclose(mixce_fixed_point(np.array([0.2, 0.8]), 0.0), [0.0, 1.0])  # η = 0: the mode
    np.testing.assert_allclose(mixce_fixed_point(np.array([0.5, 0.5]), 0.3), [0.5, 0.5])  # symmetric rows stay


# ---------------------------------------------------------------------- generator and dataset
def test_generate_chain_law_and_seed():
    chain = generate_chain(20, seed=5, zero_fraction=0.5)
    t = chain.transition
    np.testing.assert_allclose(t.sum(1), 1.0)
    assert t[chain.eos_id, chain.eos_id] == 1.0 and chain.start[chain.eos_id] == 0.0
    # each word row: 21 entries, round(10.5) = 10 zeroed (banker's rounding), 11 kept
    assert ((t[:20] > 0).sum(1) == 21 - round(0.5 * 21)).all()
    assert (chain.start[:20] > 0).sum() == 10
    np.testing.assert_array_equal(t, generate_chain(20, seed=5).transition)
    assert not np.array_equal(t, generate_chain(20, seed=6).transition)
    fixed = generate_chain(10, seed=0, eos_prob=0.1)
    np.testing.assert_allclose(fixed.transition[:10, 10], 0.1)
    assert (generate_chain(3, seed=0, zero_fraction=0.9).transition[:3] > 0).sum(1).min() >= 1  # a row keeps one entry


def test_sampling_matches_the_chain():
    chain = generate_chain(5, seed=2)
    seqs = chain.sample(4000, 8, seed=0)
    assert all(len(s) <= 8 and (s[-1] == chain.eos_id or len(s) == 8) for s in seqs)
    assert all((s[:-1] != chain.eos_id).all() for s in seqs)
    assert all(chain.transition[a, b] > 0 for s in seqs for a, b in itertools.pairwise(s))  # no impossible step
    ctx = np.concatenate([np.concatenate([[chain.bos_id], s[:-1]]) for s in seqs])
    empirical = np.bincount(ctx, minlength=chain.model_vocab_size) / len(seqs)
    np.testing.assert_allclose(empirical, chain.visit_counts(8), atol=0.06)
    assert [s.tolist() for s in chain.sample(5, 8, seed=3)] == [s.tolist() for s in chain.sample(5, 8, seed=3)]


def test_write_dataset_round_trip(tmp_path):
    from transformers import AutoTokenizer

    chain = generate_chain(7, seed=1)
    meta = write_dataset(chain, tmp_path, num_train=30, num_validation=5, max_length=6, seed=0)
    assert meta["model_vocab_size"] == 10
    assert load_chain(tmp_path).transition.tolist() == chain.transition.tolist()
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == 30 and all(set(json.loads(x)) == {"text"} for x in lines)
    seqs = load_sequences(tmp_path / "train.jsonl", chain)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (chain.bos_id, chain.eos_id, chain.pad_id)
    for line, seq in zip(lines[:10], seqs):
        text = json.loads(line)["text"]
        assert text.startswith("<bos> ")
        for special in (True, False):  # the pipeline tokenizes with add_special_tokens=False
            assert tok(text, add_special_tokens=special)["input_ids"] == [chain.bos_id, *seq.tolist()]
    assert make_tokenizer(chain).convert_ids_to_tokens([0, 6, 7, 8, 9]) == ["w0", "w6", "<eos>", "<bos>", "<pad>"]


def test_bigram_model_is_a_causal_lm(tmp_path):
    model = BigramLM(BigramConfig(vocab_size=9, bos_token_id=7, eos_token_id=6, pad_token_id=8))
    ids = torch.tensor([[7, 1, 2, 3]])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, 4, 9) and out.loss is not None
    # position t depends on token t only
    torch.testing.assert_close(out.logits[0, 2], model(input_ids=torch.tensor([[2]])).logits[0, 0])
    assert model.generate(torch.tensor([[7]]), max_new_tokens=5, do_sample=True).shape[1] <= 6
    model.resize_token_embeddings(10)
    assert model.get_output_embeddings().weight.shape == (10, 9)
    model.save_pretrained(tmp_path)
    assert BigramLM.from_pretrained(tmp_path).config.vocab_size == 10


# ---------------------------------------------------------------------- scientific checks
#: Small language and schedule shared by the two training tests (about a second each).
_V, _LEN, _N, _STEPS = 6, 12, 1500, 300
#: MLE must reach this average per-row JS (nats).  Measured on three languages of this size:
#: 0.0006–0.0011 (the closed-form count estimate on the same data: 0.0002–0.0005); a model
#: that has not learned P is at 0.1–0.4 (uniform init, or MixCE η = 0).
MLE_JS_TOLERANCE = 0.005


def _train_bigram(objective, chain, seqs):
    model = make_model("bigram", chain, _LEN, seed=0)
    train_loop(model, objective, chain, seqs, steps=_STEPS, batch_size=64, lr=0.1, seed=0)
    return evaluate_model(model, chain, _LEN, context_free=True)


@pytest.fixture(scope="module")
def small_language():
    torch.set_num_threads(1)
    chain = generate_chain(_V, seed=0)
    return chain, chain.sample(_N, _LEN, seed=1)


def test_mle_bigram_converges_to_p(small_language):
    chain, seqs = small_language
    m = _train_bigram(get_objective("mle"), chain, seqs)
    assert m["js"] < MLE_JS_TOLERANCE, m
    assert m["impossible_mass"] < 0.01, m
    assert m["rows"] == _V  # this language never reaches w1: its row is not scored


@pytest.mark.skipif("mixce" not in available(), reason="MixCE not registered")
def test_mixce_eta0_is_much_worse_than_eta1(small_language):
    chain, seqs = small_language
    js0 = _train_bigram(get_objective("mixce", eta=0.0), chain, seqs)["js"]
    js1 = _train_bigram(get_objective("mixce", eta=1.0), chain, seqs)["js"]
    # η = 0 (reverse CE only, approximated) collapses rows onto their modes; η = 1 is MLE.
    # Measured: js0 ≈ 0.16, js1 ≈ 0.0006.
    assert js0 > 0.05 and js0 > 20 * js1, (js0, js1)


@pytest.mark.skipif("mixce" not in available(), reason="MixCE not registered")
def test_mixce_converges_to_its_own_fixed_point_not_to_p(small_language):
    """MixCE(η < 1) with the token-wise approximation has a sharpened P as optimum (mixce_fixed_point).

    Measured at η = 0.3: JS(Q, fixed point) ≈ 0.0007 (as small as MLE's distance to P) while
    JS(Q, P) ≈ 0.0075.  A MixCE whose weight is wrong (not stop-gradient, 1 − q instead of q...)
    lands elsewhere.
    """
    from emo_trainer.known_p.metrics import mixce_fixed_point, restrict_to_language

    chain, seqs = small_language
    model = make_model("bigram", chain, _LEN, seed=0)
    train_loop(model, get_objective("mixce", eta=0.3), chain, seqs, steps=_STEPS, batch_size=64, lr=0.1, seed=0)
    rows = chain.row_ids[chain.visit_counts(_LEN)[chain.row_ids] > 0]
    p = chain.next_token_table()[rows]
    q = restrict_to_language(context_free_table(model, chain), chain)[rows]
    to_fixed = row_divergences(mixce_fixed_point(p, 0.3), q)["js"].mean()
    to_p = row_divergences(p, q)["js"].mean()
    assert to_fixed < MLE_JS_TOLERANCE and to_fixed < to_p / 4, (to_fixed, to_p)


# ---------------------------------------------------------------------- lab plumbing
def test_lab_smoke(tmp_path):
    from emo_trainer.known_p.lab import (
        FamilySettings,
        LabConfig,
        ObjectiveSpec,
        plot_results,
        results_markdown,
        run_lab,
    )

    config = LabConfig(
        families={"bigram": FamilySettings(vocab_sizes=(4,), steps=5, batch_size=8, lr=0.1)},
        seeds=(0, 1), num_train=20, num_eval=5, max_length=6,
        objectives=[ObjectiveSpec("MLE", "mle"), ObjectiveSpec("missing", "no_such_objective")],
    )
    results = run_lab(config, tmp_path, log=lambda _: None)
    assert results["skipped"] == {"missing": "objective 'no_such_objective' is not registered in this checkout"}
    assert {r["label"] for r in results["runs"]} == {"MLE", "bigram counts (reference)"}
    assert all(r.get("metrics") for r in results["runs"])
    md = results_markdown(json.loads((tmp_path / "results.json").read_text()))
    assert "| MLE |" in md and "V = 4" in md and "- missing:" in md
    from emo_trainer.known_p.lab import merge_results

    assert len(merge_results([results, results])["runs"]) == 2 * len(results["runs"])
    other = json.loads(json.dumps(results))
    other["config"]["max_length"] = 7
    with pytest.raises(ValueError, match="max_length"):
        merge_results([results, other])
    plot_results(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    assert (tmp_path / "data" / "V4-s1" / "tokenizer").is_dir()


def test_script_parser_builds_the_grid():
    from emo_trainer.known_p import cli as mod
    args = mod.make_parser().parse_args(["--families", "bigram", "--vocab-sizes", "20", "--seeds", "0",
                                         "--objectives", "mixce", "--etas", "0", "1", "--steps", "7"])
    config = mod.build_config(args)
    assert list(config.families) == ["bigram"] and config.families["bigram"].vocab_sizes == (20,)
    assert config.families["bigram"].steps == 7 and config.seeds == (0,)
    assert [s.options["eta"] for s in config.objectives] == [0.0, 1.0]
    full = mod.build_config(mod.make_parser().parse_args(["--full"]))
    assert max(full.families["bigram"].vocab_sizes) == 1000 and full.num_train == 50_000


def test_trainer_path_and_checkpoint_evaluation(tmp_path):
    """The bigram model trains through ObjectiveTrainer; a saved checkpoint is scored from disk."""
    from emo_trainer.known_p.lab import evaluate_checkpoint
    from emo_trainer.known_p.training import train_with_trainer

    chain = generate_chain(4, seed=0)
    write_dataset(chain, tmp_path / "data", num_train=64, num_validation=16, max_length=6, seed=0)
    seqs = load_sequences(tmp_path / "data" / "train.jsonl", chain)
    model = make_model("bigram", chain, 6, seed=0)
    before = evaluate_model(model, chain, 6, context_free=True)["js"]
    logs = train_with_trainer(model, "mixce", chain, seqs, str(tmp_path / "run"), steps=20, batch_size=16, lr=0.1,
                              objective_options={"eta": 0.5})
    assert logs and "weight" in logs[-1]  # the objective's diagnostics reach the Trainer's logs
    after = evaluate_model(model, chain, 6, context_free=True)
    assert after["js"] < before
    model.save_pretrained(tmp_path / "ckpt")
    from_disk = evaluate_checkpoint(tmp_path / "ckpt", tmp_path / "data")
    assert from_disk["js"] == pytest.approx(after["js"], rel=1e-6)


def test_script_user_errors_are_one_line(tmp_path, capsys):
    """A misspelt objective is refused (it was silently dropped); --evaluate checks its folders and
    that the model speaks the dataset's language."""
    from emo_trainer.known_p import cli as mod

    def err(argv):
        assert mod.main(argv) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "unknown 'emoo' (did you mean emo?)" in err(["--output-dir", str(tmp_path / "o"), "--objectives", "mle", "emoo"])
    chain = generate_chain(4, seed=0)
    write_dataset(chain, tmp_path / "data", num_train=8, num_validation=4, max_length=6, seed=0)
    assert "not a saved model folder" in err(["--evaluate", str(tmp_path / "nope"), "--data", str(tmp_path / "data")])
    make_model("bigram", chain, 6, seed=0).save_pretrained(tmp_path / "ckpt")
    capsys.readouterr()  # the save's progress bar
    assert "not a lab dataset folder" in err(["--evaluate", str(tmp_path / "ckpt"), "--data", str(tmp_path / "nodata")])
    other = generate_chain(7, seed=1)
    write_dataset(other, tmp_path / "data7", num_train=8, num_validation=4, max_length=6, seed=0)
    assert "the language of" in err(["--evaluate", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data7")])
