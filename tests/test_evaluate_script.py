"""scripts/evaluate.py on tiny local checkpoints and local text/jsonl files (offline)."""

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import documents, tiny_gpt2, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-script")
    docs = documents(80)
    tok = tiny_tokenizer(docs[:40])
    for i in (0, 1):
        tiny_gpt2(tok, seed=i).save_pretrained(root / f"ckpt{i}")
        tok.save_pretrained(root / f"ckpt{i}")
    (root / "eval.txt").write_text("\n".join(["= Heading =", "", *docs]) + "\n")
    (root / "eval.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    return root


COMMON = ["--featurizer", "hashing", "--num-prompts", "50", "--max-new-tokens", "8", "--block-size", "32",
          "--eval", "prompt_words=8", "--eval", "continuation_words=24", "--eval", "mauve_kmeans_num_redo=1", "--eval", "mauve_kmeans_max_iter=50"]


def test_two_checkpoints_two_seeds(setup):
    out = setup / "results.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 50 samples: MAUVE warns
        rc = _script().main([str(setup / "ckpt0"), str(setup / "ckpt1"), "--eval-files", str(setup / "eval.txt"),
                             "--seeds", "0", "1", "--output", str(out), *COMMON])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["protocol"]["seeds"] == [0, 1] and res["protocol"]["num_prompts_built"] == 50
    assert res["protocol"]["num_documents"] == 81  # the empty line is dropped; the heading is text (not a prompt)
    assert res["reference"]["ref_mean_length"] == 24.0
    assert set(res["checkpoints"]) == {str(setup / "ckpt0"), str(setup / "ckpt1")}
    for r in res["checkpoints"].values():
        assert len(r["per_seed"]) == 2 and r["mauve_num_samples"] == 50
        assert {"mauve", "mauve_std", "diversity", "diversity_std", "rep_2", "distinct_1", "mean_length"} <= set(r)
        assert r["mauve"] == pytest.approx((r["per_seed"][0]["mauve"] + r["per_seed"][1]["mauve"]) / 2)
        assert r["block_size"] == 32 and r["num_tokens"] == r["num_blocks"] * 31  # 31 targets per packed block
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
    a, b = res["checkpoints"].values()
    assert a["perplexity"] != b["perplexity"]


def test_jsonl_column_and_perplexity_only(setup):
    out = setup / "ppl.json"
    rc = _script().main([str(setup / "ckpt0"), "--eval-files", str(setup / "eval.jsonl"), "--text-column", "body",
                         "--no-generation", "--output", str(out), *COMMON])
    assert rc == 0
    r = json.loads(out.read_text())["checkpoints"][str(setup / "ckpt0")]
    assert "mauve" not in r and r["perplexity"] > 1


def test_clear_errors(setup, tmp_path):
    script = _script()
    with pytest.raises(SystemExit, match="no eval data"):
        script.main([str(setup / "ckpt0"), "--output", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="cannot load|no tokenizer"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 50 prompts: MAUVE warns before the model is loaded
        script.main([str(tmp_path), "--eval-files", str(setup / "eval.txt"), "--output", str(tmp_path / "x.json"),
                     *COMMON])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        script.main([str(setup / "ckpt0"), "--eval-files", str(setup / "eval.txt"), "--output", "x.json",
                     "--eval", "not_a_key=1"])
