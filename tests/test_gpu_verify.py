"""emo_trainer.benchmarks.gpu_verify (benchmarks/gpu_verify.py) without a GPU: the pass/fail judges on fake measurements, the merge that keeps
earlier checks with their dates, the JSON/Markdown writer, and the call plan's budget."""

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gv():
    from emo_trainer.benchmarks import gpu_verify

    return gpu_verify


def _history(steps=300, eval_losses=(4.0, 3.5), every=150, loss=3.9, nan_at=None):
    hist = [{"step": s, "loss": (math.nan if s == nan_at else loss), "grad_norm": 1.0} for s in range(10, steps + 1, 10)]
    for i, e in enumerate(eval_losses):
        step = every * (i + 1)
        hist.append({"step": step, "eval_loss": e, "eval_perplexity": math.exp(e), "eval_runtime": 2.0})
        hist.append({"step": step, "eval_mauve": 0.5, "eval_rep_2": 0.1, "eval_generation_runtime": 10.0,
                     "eval_mauve_runtime": 1.0})
    hist.append({"step": steps, "train_runtime": 100.0, "train_loss": loss})
    return hist


def test_accelerate_judge(gv):
    ok, d = gv.judge_accelerate(0, _history(), min_steps=300, block_size=256, batch_size=32)
    assert ok, d["failed_because"]
    assert d["evaluations_with_perplexity_mauve_repetition"] == [150, 300]
    assert d["one_eval_cost_s"]["total"] == 12.0
    assert d["tokens_per_s_incl_eval"] == pytest.approx(300 * 32 * 256 / 100.0)
    assert d["tokens_per_s_train_only"] == pytest.approx(300 * 32 * 256 / 76.0, rel=1e-3)

    ok, d = gv.judge_accelerate(0, _history(eval_losses=(3.5, 4.0)), min_steps=300, block_size=256, batch_size=32)
    assert not ok and any("did not fall" in r for r in d["failed_because"])
    ok, d = gv.judge_accelerate(0, _history(nan_at=100), min_steps=300, block_size=256, batch_size=32)
    assert not ok and d["nonfinite"]
    ok, d = gv.judge_accelerate(0, _history(steps=200, eval_losses=(4.0,)), min_steps=300, block_size=256, batch_size=32)
    assert not ok and len(d["failed_because"]) >= 2
    ok, _ = gv.judge_accelerate(1, [], min_steps=300, block_size=256, batch_size=32)
    assert not ok


def _run(ce, rc=0, steps=300, grad=1.0):
    return {"rc": rc, "history": [{"step": steps, "loss": 3.0, "grad_norm": grad},
                                  {"step": steps, "eval_loss": ce + 1, "eval_perplexity": math.exp(ce)}]}


def test_numerics_judge(gv):
    runs = {"mle": {"bf16": _run(3.03), "fp32": _run(3.0)}, "emo": {"bf16": _run(2.99), "fp32": _run(3.0)}}
    ok, d = gv.judge_numerics(runs)
    assert ok, d["failed_because"]
    assert d["runs"]["mle"]["relative_gap"] == pytest.approx(0.01)
    assert d["runs"]["mle"]["bf16"]["eval_ce"] == pytest.approx(3.03)  # log(perplexity), not the objective's loss

    runs["mle"]["bf16"] = _run(3.1)  # +3.3 %
    ok, d = gv.judge_numerics(runs)
    assert not ok and any("mle" in r for r in d["failed_because"])
    runs["mle"]["bf16"] = _run(3.0, grad=math.inf)
    ok, d = gv.judge_numerics(runs)
    assert not ok and any("non-finite" in r for r in d["failed_because"])
    runs["mle"]["bf16"] = _run(3.0, steps=100)
    assert not gv.judge_numerics(runs)[0]


def _losses(values, rc=0):
    return {"rc": rc, "history": [{"step": 5 * (i + 1), "loss": v} for i, v in enumerate(values)]}


def test_distributed_judge(gv):
    plain = {"mle": _losses([10.0] * 10), "emo": _losses([8.0] * 10)}
    close = {"mle": _losses([10.05] * 10), "emo": _losses([7.95] * 10)}
    ok, d = gv.judge_distributed(plain, close)
    assert ok, d["failed_because"]
    assert d["objectives"]["mle"]["max_relative_diff"] == pytest.approx(0.005)

    far = {"mle": _losses([10.0] * 9 + [10.2]), "emo": close["emo"]}
    ok, d = gv.judge_distributed(plain, far)
    assert not ok and any(r.startswith("mle") for r in d["failed_because"])
    ok, d = gv.judge_distributed(plain, {"mle": _losses([10.0] * 10, rc=1), "emo": close["emo"]})
    assert not ok
    ok, d = gv.judge_distributed(plain, {"mle": _losses([10.0] * 4), "emo": _losses([8.0] * 4)})
    assert not ok  # 20 steps compared, 50 wanted
    unsharded = {"mle": dict(close["mle"], active=False), "emo": dict(close["emo"], active=True)}
    ok, d = gv.judge_distributed(plain, unsharded)
    assert not ok and any("no sign" in r for r in d["failed_because"])


def _bench(rows):
    return {"meta": {"device": "fake"}, "results": [
        {"case": c, "status": st, "step_ms_median": t * 100, "step_ms_mean": t * 100, "time_ratio": t,
         "peak_extra_mib": m, "memory_ratio": m / 1000, "note": ""} for c, st, t, m in rows]}


def test_sequencematch_speed_judge(gv):
    base = [("builtin", "ok", 1.0, 1000.0), ("sequencematch+sampling/full", "ok", 4.0, 900.0)]
    ok, d = gv.judge_sm_speed(_bench(base + [("sequencematch/full", "ok", 1.2, 800.0)]), cudnn_rows=0)
    assert ok and d["with_sampling_amortised"]["sequencematch+sampling/full"]["time_ratio"] == 4.0
    assert not gv.judge_sm_speed(_bench(base + [("sequencematch/full", "ok", 1.3, 800.0)]))[0]
    assert not gv.judge_sm_speed(_bench(base + [("sequencematch/full", "error", 1.0, 1.0)]))[0]
    assert not gv.judge_sm_speed(_bench(base))[0]


def test_peers_judge_and_targets(gv):
    gpt2 = _bench([("builtin", "ok", 1.0, 1000.0), ("mle/chunked", "ok", 0.75, 500.0), ("emo/chunked", "ok", 0.97, 600.0),
                   ("cce-lce", "ok", 0.8, 550.0), ("trl-chunked-nll", "ok", 0.9, 700.0), ("liger-flce", "ok", 0.9, 600.0)])
    large = _bench([("builtin", "ok", 1.0, 1000.0), ("mle/chunked", "ok", 0.7, 400.0),
                    ("cce-lce", "ok", 0.75, 380.0), ("trl-chunked-nll", "ok", 0.9, 700.0), ("liger-flce", "ok", 0.9, 600.0)])
    ok, d = gv.judge_peers({"gpt2": gpt2, "large-vocab": large})
    assert ok, d["failed_because"]
    met = {(t["table"], t["target"]): t["met"] for t in d["targets"]}
    assert met[("gpt2", "mle/chunked step <= 0.8x built-in")]
    assert met[("gpt2", "mle/chunked extra peak <= cce-lce's")]
    assert not met[("gpt2", "emo/chunked step <= 0.95x built-in")]
    assert met[("large-vocab", "mle/chunked faster and leaner than liger-flce")]
    assert not met[("large-vocab", "mle/chunked faster and leaner than cce-lce")]  # leaner fails: 400 > 380
    assert "emo/chunked step <= 0.95x built-in (gpt2)" in d["targets_missed"]

    large["results"] = [r for r in large["results"] if r["case"] != "cce-lce"]
    ok, d = gv.judge_peers({"gpt2": gpt2, "large-vocab": large})
    assert not ok and any("cce-lce" in r for r in d["failed_because"])


def test_merge_keeps_earlier_checks_and_writes_schema(gv, tmp_path):
    meta1 = {"device": "NVIDIA H100", "date": "2026-12-01 10:00:00 UTC", "versions": {"torch": "2.11"},
             "command": "python3 scripts/gpu_verify.py --call 1", "commands": ["python3 scripts/gpu_verify.py --call 1"]}
    first = [{"name": "fsdp2", "passed": True, "status": "ran", "date": meta1["date"], "device": "NVIDIA H100",
              "details": {"max_relative_diff": 0.001}},
             {"name": "deepspeed_zero3", "passed": False, "status": "ran", "date": meta1["date"], "device": "NVIDIA H100",
              "details": {"failed_because": ["emo: exit codes plain 0, this 1"]}}]
    res = gv.merge_results(None, first, meta1)
    path = tmp_path / "gpu-verification.json"
    gv.write_results(res, path)
    loaded = json.loads(path.read_text())
    assert {"device", "date", "versions", "commands", "checks"} <= set(loaded)
    assert all({"name", "passed", "details"} <= set(c) for c in loaded["checks"])

    meta2 = dict(meta1, date="2026-12-02 09:00:00 UTC", device="NVIDIA H200", command="python3 scripts/gpu_verify.py --call 3",
                 commands=["python3 scripts/gpu_verify.py --call 3"])
    second = [{"name": "deepspeed_zero3", "passed": True, "status": "ran", "date": meta2["date"], "device": "NVIDIA H200",
               "details": {}},
              {"name": "fsdp2", "passed": False, "status": "skipped", "date": meta2["date"], "device": "NVIDIA H200",
               "details": {"reason": "budget"}},
              {"name": "sequencematch_full_speed", "passed": False, "status": "skipped", "date": meta2["date"],
               "device": "NVIDIA H200", "details": {"reason": "not installed: torch"}}]
    merged = gv.merge_results(loaded, second, meta2)
    by = {c["name"]: c for c in merged["checks"]}
    assert by["fsdp2"]["passed"] and by["fsdp2"]["date"] == meta1["date"]  # a skip never replaces a result
    assert by["deepspeed_zero3"]["passed"] and by["deepspeed_zero3"]["device"] == "NVIDIA H200"
    assert by["sequencematch_full_speed"]["status"] == "skipped"  # nothing earlier: the skip is recorded
    assert [c["name"] for c in merged["checks"]] == [n for n in gv.BY_NAME if n in by]  # the driver's order
    assert merged["commands"] == ["python3 scripts/gpu_verify.py --call 1", "python3 scripts/gpu_verify.py --call 3"]
    assert len(merged["history"]) == 2 and merged["date"] == meta2["date"]
    gv.write_results(merged, path)
    md = path.with_suffix(".md").read_text()
    assert "| `fsdp2` | passed | 2026-12-01" in md and "| `sequencematch_full_speed` | not run |" in md


def test_every_check_has_a_call_that_fits(gv):
    names = set()
    for call in gv.CALL_CARRY:
        checks = [c for c in gv.CHECKS if c.call == call]
        assert checks and gv.SETUP_S + sum(c.estimate_s for c in checks) < 9 * 60
        names |= {c.name for c in checks}
    assert names == {"accelerate_launch_emo_gpt2", "bf16_numerics_all_objectives", "deepspeed_zero2", "deepspeed_zero3",
                     "fsdp2", "sequencematch_full_speed", "benchmark_peers_cce_trl"}
    with pytest.raises(SystemExit):
        gv.select(gv.make_parser().parse_args(["--checks", "nope"]))
    assert [c.name for c in gv.select(gv.make_parser().parse_args(["--call", "2"]))] == [
        "bf16_numerics_all_objectives", "sequencematch_full_speed", "benchmark_peers_cce_trl"]


def test_merge_files_of_back_to_back_calls(gv, tmp_path):
    def result(name, date, passed):
        meta = {"device": "NVIDIA H100", "date": date, "versions": {}, "command": f"call {name}", "commands": [f"c {name}"]}
        return gv.merge_results(None, [{"name": name, "passed": passed, "status": "ran", "date": date,
                                        "device": "NVIDIA H100", "details": {}}], meta)

    base = result("fsdp2", "2026-12-01", True)
    (tmp_path / "a.json").write_text(json.dumps(result("deepspeed_zero2", "2026-12-02", True)))
    (tmp_path / "b.json").write_text(json.dumps(result("fsdp2", "2026-12-02", False)))
    target = tmp_path / "gpu-verification.json"
    target.write_text(json.dumps(base))
    assert gv.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--results", str(target)]) == 0
    merged = json.loads(target.read_text())
    by = {c["name"]: c for c in merged["checks"]}
    assert by["deepspeed_zero2"]["passed"] and not by["fsdp2"]["passed"] and by["fsdp2"]["date"] == "2026-12-02"
    assert [h["command"] for h in merged["history"]] == ["call fsdp2", "call deepspeed_zero2", "call fsdp2"]
    assert target.with_suffix(".md").exists()
