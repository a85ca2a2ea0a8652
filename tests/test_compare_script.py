"""scripts/compare.py (emo_trainer.evaluation.compare) on synthetic run directories: merged eval
events, PNG, Markdown table."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    from emo_trainer.evaluation import compare

    return compare


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


def test_labels_and_results_json(runs, tmp_path, capsys):
    script = _script()
    assert script.main([str(runs / "mle"), "--labels", "a", "b", "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --labels: 2 labels for 1 rows (mle)"]
    res = {"reference": {"ref_diversity": 0.8}, "checkpoints": {"ckpt": {"perplexity": 12.0, "mauve": 0.9,
                                                                          "mauve_std": 0.01, "per_seed": []}}}
    (tmp_path / "r.json").write_text(json.dumps(res))
    assert script.main([str(tmp_path / "r.json"), "--output-dir", str(tmp_path / "o")]) == 0
    table = (tmp_path / "o" / "compare.md").read_text()
    assert "| ckpt | ? | – | – | 12 | 0.9 ± 0.01 |" in table and not (tmp_path / "o" / "compare.png").exists()
    assert script.main([str(tmp_path / "o"), "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'o'}: no trainer_state.json (nor checkpoint-*/trainer_state.json); is it a run directory?"]


def _evaluate_json(path: Path, source: str, sha: str, ref_diversity: float, checkpoints: dict) -> Path:
    """A scripts/evaluate.py result (the keys compare.py reads)."""
    path.write_text(json.dumps({
        "protocol": {"eval_source": [source], "eval_data_sha256": sha, "num_prompts_built": 64},
        "reference": {"ref_diversity": ref_diversity, "ref_rep_4": 0.02},
        "checkpoints": {name: {"perplexity": ppl, "mauve": mauve, "mauve_num_samples": 64, "objective": obj,
                               "sampler": "x", "per_seed": []} for name, (ppl, mauve, obj) in checkpoints.items()},
    }))
    return path


def _rows(table: str) -> list[str]:
    return [line for line in table.splitlines() if line.startswith("| ")]


def test_results_json_on_different_data(tmp_path, capsys):
    """Same checkpoints evaluated on two data sets: unique labels, objectives, one human row per data set."""
    ckpts = {"runs/mle/final": (20.0, 0.8, "mle"), "runs/sm/final": (21.0, 0.7, "sequencematch")}
    a = _evaluate_json(tmp_path / "wiki.json", "wiki.test.raw", "aaaa", 0.8, ckpts)
    b = _evaluate_json(tmp_path / "web.json", "web.txt", "bbbb", 0.6, {"runs/mle/final": (30.0, 0.5, "mle")})
    out = tmp_path / "cmp"
    assert _script().main([str(a), str(b), "--output-dir", str(out)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        ("warning: the rows were evaluated on 2 different data sets (A: runs/mle/final [wiki.json], runs/sm/final; "
        "B: runs/mle/final [web.json]): compare numbers within a data set only")]
    table = (out / "compare.md").read_text()
    assert _rows(table) == [
        ("| run | objective | data | step | eval loss | perplexity | MAUVE | diversity | rep-2 | rep-4 | seq-rep-4 | "
        "distinct-2 | length |"),
        "| runs/mle/final [wiki.json] | mle | A | – | – | 20 | 0.8 | – | – | – | – | – | – |",
        "| runs/sm/final | sequencematch | A | – | – | 21 | 0.7 | – | – | – | – | – | – |",
        "| runs/mle/final [web.json] | mle | B | – | – | 30 | 0.5 | – | – | – | – | – | – |",
        "| human (reference continuations, data A) | – | A | – | – | – | – | 0.8 | – | 0.02 | – | – | – |",
        "| human (reference continuations, data B) | – | B | – | – | – | – | 0.6 | – | 0.02 | – | – | – |",
    ]
    assert ("Evaluated on 2 different data sets: A = wiki.test.raw (evaluated in " + str(a) + "); B = web.txt "
            "(evaluated in " + str(b) + "). Compare rows within one data set only.") in table


def test_results_json_same_data_and_run_directories(runs, tmp_path, capsys):
    """The same data twice: one human row, no data column; same-named rows and directories disambiguated."""
    a = _evaluate_json(tmp_path / "r1.json", "wiki.test.raw", "aaaa", 0.8, {"runs/mle/final": (20.0, 0.8, "mle")})
    (tmp_path / "x").mkdir()
    b = _evaluate_json(tmp_path / "x" / "r1.json", "wiki.test.raw", "aaaa", 0.8,
                       {"runs/mle/final": (19.0, 0.81, "mle")})
    out = tmp_path / "cmp"
    assert _script().main([str(a), str(b), "--output-dir", str(out)]) == 0
    assert capsys.readouterr().err == ""
    rows = _rows((out / "compare.md").read_text())
    assert [r.split(" | ")[0:2] for r in rows[1:]] == [
        [f"| runs/mle/final [{tmp_path.name}/r1.json]", "mle"], ["| runs/mle/final [x/r1.json]", "mle"],
        ["| human (reference continuations)", "–"]]

    # two run directories both named "mle": labelled by their parents
    other = tmp_path / "other" / "mle"
    other.mkdir(parents=True)
    (other / "trainer_state.json").write_text(json.dumps({"log_history": _history(2.0, False)}))
    assert _script().main([str(runs / "mle"), str(other), "--output-dir", str(out)]) == 0
    rows = _rows((out / "compare.md").read_text())
    assert [r.split(" | ")[0:2] for r in rows[1:3]] == [[f"| {runs.name}/mle", "mle"], ["| other/mle", "?"]]
    assert len(rows) == 4 and rows[3].startswith("| human (reference continuations) |")  # same references

    assert _script().main([str(runs / "mle"), str(other), "--labels", "x", "x", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --labels: x given twice; every row needs its own label"]


def test_objective_of_an_older_json_from_the_run_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "emo" / "final").mkdir(parents=True)
    (tmp_path / "runs" / "emo" / "emo_trainer_config.yaml").write_text("objective:\n  name: emo\n")
    res = {"reference": {}, "checkpoints": {"runs/emo/final": {"perplexity": 12.0}}}  # no "objective" key
    (tmp_path / "r.json").write_text(json.dumps(res))
    assert _script().main(["r.json", "--output-dir", "o"]) == 0
    assert "| runs/emo/final | emo | – | – | 12 |" in (tmp_path / "o" / "compare.md").read_text()


def test_run_directories_on_different_data(runs, tmp_path):
    state = runs / "emo" / "checkpoint-100" / "trainer_state.json"
    history = json.loads(state.read_text())["log_history"]
    for h in history:
        if "eval_ref_diversity" in h:
            h["eval_ref_diversity"] = 0.7
    state.write_text(json.dumps({"log_history": history}))
    out = tmp_path / "cmp"
    assert _script().main([str(runs / "mle"), str(runs / "emo"), "--output-dir", str(out)]) == 0
    rows = _rows((out / "compare.md").read_text())
    assert rows[1].startswith("| mle | mle | A | 100 |") and rows[2].startswith("| emo | emo | B | 100 |")
    assert rows[3].startswith("| human (reference continuations, data A) | – | A | – | – | – | – | 0.8 |")
    assert rows[4].startswith("| human (reference continuations, data B) | – | B | – | – | – | – | 0.7 |")


@pytest.mark.parametrize("case", ["missing", "not_json", "not_results"])
def test_bad_input_one_line_exit_2(case, tmp_path, capsys):
    path = tmp_path / "r.json"
    if case == "not_json":
        path.write_text("{oops")
    elif case == "not_results":
        path.write_text("[1, 2]")
    expected = {
        "missing": f"error: {path}: no such file",
        "not_json": f"error: {path}: not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                    "column 2 (char 1)); expected a scripts/evaluate.py result",
        "not_results": f"error: {path}: no 'checkpoints' in it; expected a scripts/evaluate.py result",
    }[case]
    assert _script().main([str(path), "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.splitlines() == [expected]
    assert _script().main([str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.splitlines() == [(f"error: {tmp_path / 'nope'}: no such run directory (or "
                                                    "evaluate.py JSON file)")]
