"""scripts/compare.py on synthetic run directories: merged eval events, PNG, Markdown table."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("compare_script", ROOT / "scripts" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _history(scale: float, seeds: bool) -> list[dict]:
    h = [{"loss": 5.0, "step": 10}]
    for step in (50, 100):
        h.append({"eval_loss": scale * 4 / step * 50, "eval_perplexity": 50.0 * scale / step * 50, "step": step})
        gen = {"eval_mauve": 0.2 * step / 50 / scale, "eval_diversity": 0.5, "eval_rep_4": 0.1, "step": step,
               "eval_generation_runtime": 1.0, "eval_mauve_num_samples": 64}
        if seeds:
            gen.update({"eval_mauve_std": 0.05, "eval_diversity_std": 0.02})
        if step == 50:
            gen.update({"eval_ref_diversity": 0.8, "eval_ref_rep_4": 0.02})
        h.append(gen)
    h.append({"train_runtime": 10.0, "step": 100})
    # a final evaluate() at the same step (e.g. after loading the best checkpoint)
    h.append({"eval_loss": 9.9, "eval_perplexity": 99.0, "step": 100})
    h.append({"eval_mauve": 0.33, "eval_diversity": 0.5, "step": 100})
    return h


@pytest.fixture
def runs(tmp_path):
    for name, scale, seeds in (("mle", 1.0, False), ("emo", 0.9, True)):
        d = tmp_path / name
        (d / "checkpoint-100").mkdir(parents=True)
        (d / "checkpoint-100" / "trainer_state.json").write_text(json.dumps({"log_history": _history(scale, seeds)}))
        (d / "emo_trainer_config.yaml").write_text(f"objective:\n  name: {name}\n")
    return tmp_path


def test_eval_events_merge_per_step():
    events = _script().eval_events(_history(1.0, False))
    assert [e["step"] for e in events] == [50, 100, 100]
    assert {"eval_loss", "eval_mauve", "eval_ref_diversity"} <= set(events[0])
    assert events[2]["eval_loss"] == 9.9 and events[2]["eval_mauve"] == 0.33


def test_plot_and_table(runs, tmp_path):
    out = tmp_path / "cmp"
    assert _script().main([str(runs / "mle"), str(runs / "emo"), "--output-dir", str(out), "--title", "t"]) == 0
    compare = _script()
    curve = compare.read_run(runs / "emo")["curve"]
    assert [e["step"] for e in curve] == [50, 100] and curve[1]["eval_mauve_std"] == 0.05  # training-time evals
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| mle | mle | 100 | 9.9 | 99 | 0.33 |")  # final numbers: the last evaluation
    # the final evaluate() had no std: the std of the earlier evaluation at that step is not paired with it
    assert "| emo | emo | 100 |" in rows[2] and "| 0.33 |" in rows[2] and "±" not in rows[2]
    assert rows[3].startswith("| human (reference continuations) | – | – | – | – | – | 0.8 |")
    assert "64 samples per side (under 500" in table


def test_labels_and_results_json(runs, tmp_path):
    script = _script()
    with pytest.raises(SystemExit, match="labels"):
        script.main([str(runs / "mle"), "--labels", "a", "b", "--output-dir", str(tmp_path)])
    res = {"reference": {"ref_diversity": 0.8}, "checkpoints": {"ckpt": {"perplexity": 12.0, "mauve": 0.9,
                                                                          "mauve_std": 0.01, "per_seed": []}}}
    (tmp_path / "r.json").write_text(json.dumps(res))
    assert script.main([str(tmp_path / "r.json"), "--output-dir", str(tmp_path / "o")]) == 0
    table = (tmp_path / "o" / "compare.md").read_text()
    assert "| ckpt | ? | – | – | 12 | 0.9 ± 0.01 |" in table and not (tmp_path / "o" / "compare.png").exists()
    with pytest.raises(SystemExit, match="no trainer_state"):
        script.main([str(tmp_path / "o"), "--output-dir", str(tmp_path)])
