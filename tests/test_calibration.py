"""The calibration workflow: sentence set built, saved with the run, identical across objectives."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_tiny_gpt2

ROOT = Path(__file__).resolve().parents[1]

DOCS = [
    " = Valkyria Chronicles III = ",
    (" The game began development in 2010 , carrying over a large portion of the work . It was a role @-@ playing "
    "game made by Sega . The team wanted a story that was more forgiving than the first one ."),
    " = = Gameplay = = ",
    " Short line .",
    (" As with previous games , the player can choose the order of missions . Each mission has a map of the "
    "battlefield . An <unk> sentence here is dropped from the set entirely . Units move in real time on the map ."),
    (" The music was composed by Hitoshi Sakimoto , who had also worked on the previous games . It was released on "
    "a soundtrack in 2011 . Critics praised the score and the many tracks of the album ."),
]


@pytest.fixture
def corpus(tmp_path, tiny_tokenizer):
    base = tmp_path / "base"
    make_tiny_gpt2(vocab_size=len(tiny_tokenizer)).save_pretrained(str(base))
    tiny_tokenizer.save_pretrained(str(base))
    (tmp_path / "wiki.train.tokens").write_text("\n".join(DOCS * 4) + "\n")
    (tmp_path / "wiki.valid.raw").write_text("\n".join(DOCS) + "\n")
    return tmp_path, base


def _overrides(tmp_path, base, out: str, *extra: str) -> list[str]:
    return [
        f"--model.name_or_path={base}", "--data.dataset=null",
        f"--data.train_files=[{tmp_path / 'wiki.train.tokens'}]",
        f"--data.validation_files=[{tmp_path / 'wiki.valid.raw'}]",
        "--data.detokenize=wikitext", "--data.calibration_sentences=6", "--data.block_size=16",
        "--eval.generation=false", f"--training.output_dir={tmp_path / out}", "--training.use_cpu=true",
        *extra,
    ]


def test_calibration_set_saved_and_identical_across_objectives(corpus):
    from emo_trainer.cli import build_trainer
    from emo_trainer.config import load_config

    tmp_path, base = corpus
    sets, blocks = {}, {}
    for objective in ("emo", "mle"):
        cfg = load_config(ROOT / "configs/calibrate_emo.yaml", _overrides(tmp_path, base, objective, "--objective", objective))
        trainer, _ = build_trainer(cfg)
        saved = tmp_path / objective / "calibration_set.txt"
        assert saved.is_file(), "the calibration set is saved with the run"
        sets[objective] = saved.read_text().splitlines()
        blocks[objective] = trainer.train_dataset["input_ids"]
    assert sets["emo"] == sets["mle"] and blocks["emo"] == blocks["mle"]
    sents = sets["emo"]
    assert len(sents) == 6
    for s in sents:
        assert "<unk>" not in s and not s.startswith("=") and len(s.split()) >= 5
        assert "@-@" not in s and " ," not in s  # detokenized


def test_calibration_set_depends_on_seed(corpus):
    from emo_trainer.data import calibration_set

    docs = DOCS * 4
    assert calibration_set(docs, 4, seed=1) == calibration_set(docs, 4, seed=1)
    assert calibration_set(docs, 4, seed=1) != calibration_set(docs, 4, seed=2)


def test_objective_switch_changes_only_the_objective(corpus):
    from emo_trainer.config import load_config

    tmp_path, base = corpus
    emo = load_config(ROOT / "configs/calibrate_emo.yaml", _overrides(tmp_path, base, "run")).to_dict()
    for other in ("mle", "mixce", "mile"):
        switched = load_config(ROOT / "configs/calibrate_emo.yaml",
                               _overrides(tmp_path, base, "run", "--objective", other)).to_dict()
        assert switched["objective"].pop("name") == other
        ref = dict(emo)
        ref["objective"] = {k: v for k, v in emo["objective"].items() if k != "name"}
        assert switched == ref


def test_shipped_calibration_config():
    from emo_trainer.config import load_config

    cfg = load_config(ROOT / "configs/calibrate_emo.yaml")
    assert cfg.objective.name == "emo" and cfg.data.calibration_sentences == 25000
    opts = cfg.objective.selected_options()
    assert opts["cost_embedding"] == "initial"
    assert opts["mode"] == 1 and opts["ratio_cap"] == 3.0  # mode 2 hurt a shifted-domain calibration (docs/calibration.md)
    t = cfg.training
    assert t["learning_rate"] == 5e-5 and t["num_train_epochs"] == 1 and t["warmup_steps"] == 0.03
    assert t["per_device_train_batch_size"] == 16 and cfg.data.block_size == 256


def test_detokenize_option(tmp_path):
    from emo_trainer.config import DataConfig
    from emo_trainer.data import load_raw_splits

    (tmp_path / "t.tokens").write_text(" a role @-@ playing game , made in 2 @,@ 000 .\n")
    (tmp_path / "v.tokens").write_text(" the end .\n")
    cfg = DataConfig(train_files=[str(tmp_path / "t.tokens")], validation_files=[str(tmp_path / "v.tokens")],
                     detokenize="wikitext")
    raw = load_raw_splits(cfg)
    assert raw["train"]["text"] == ["a role-playing game, made in 2,000."]
    assert raw["validation"]["text"] == ["the end."]


def test_study_resumes_only_with_its_own_settings(tmp_path):
    """scripts/calibration_study.py caches each model's eval.json: a re-run with other settings
    (which would mix models made differently) is refused; other --objectives may be added."""
    from emo_trainer import study

    parse = study.make_parser().parse_args
    out = tmp_path / "study"
    out.mkdir()
    files = ["--model", "m", "--train-file", "t", "--valid-file", "v", "--test-file", "x"]
    base = ["--output-dir", str(out), *files, "--sentences", "200", "--objectives", "none", "mle"]
    assert study.check_settings(parse(base), out) is None
    assert (out / "study_settings.json").is_file()
    assert study.check_settings(parse([*base, "emo", "--jobs", "2"]), out) is None  # more objectives, more jobs
    assert study.check_settings(parse([*base, "--seeds", "4", "--decodings"]), out) is None  # evaluation only
    problem = study.check_settings(parse([*base[:11], "150", "--learning-rate", "1e-4"]), out)
    assert "--sentences 200 → 150" in problem and "--learning-rate 5e-05 → 0.0001" in problem


def test_study_validation_text_is_detokenized_like_training(tmp_path):
    from emo_trainer import study
    from emo_trainer.data import detokenize_wikitext

    files = ["--model", "m", "--train-file", "t", "--test-file", "x", "--output-dir", str(tmp_path)]
    raw = tmp_path / "valid.raw"
    raw.write_text(" = Title = \n The well @-@ known song , \" Hey \" , was 1 @,@ 000 years old . \n")
    args = study.make_parser().parse_args([*files, "--valid-file", str(raw)])
    path = study.validation_file(args, tmp_path, write=True)
    want = [detokenize_wikitext(x) for x in raw.read_text().splitlines()]
    assert path.read_text().splitlines() == want and "well-known" in want[1]
    assert f"--data.validation_files=[{path}]" in study.calibration_overrides(args, study.parse_row("mle"), tmp_path)
    off = study.make_parser().parse_args([*files, "--valid-file", str(raw), "--detokenize", "none"])
    assert study.validation_file(off, tmp_path) == raw


def test_fresh_study_runs_end_to_end(corpus, tmp_path):
    """A new --output-dir (no validation.txt, nothing cached) runs the whole study: calibration set,
    two calibrated rows (one a named variant with its own override) + the base, evaluation, reports.
    The first study command on a fresh directory once stopped with "validation_files: file not found"."""
    import json
    import random

    from emo_trainer import study

    _, base = corpus
    rng = random.Random(0)
    words = ["the", "game", "was", "made", "by", "a", "team", "that", "wanted", "the", "story", "to", "be", "more", "forgiving", "than", "before"]
    (tmp_path / "wiki.test.raw").write_text(
        "\n".join(" ".join(rng.choice(words) for _ in range(12)) + " ." for _ in range(55)) + "\n")
    out = tmp_path / "fresh-study"
    argv = ["--output-dir", str(out), "--model", str(base), "--train-file", str(tmp_path / "wiki.train.tokens"),
            "--valid-file", str(tmp_path / "wiki.valid.raw"), "--test-file", str(tmp_path / "wiki.test.raw"),
            "--objectives", "none", "mle", "mle-lr1e-3=mle:training.learning_rate=1e-3",
            "--sentences", "8", "--block-size", "16", "--batch-size", "2", "--num-prompts", "50",
            "--prompt-words", "4", "--continuation-words", "4", "--max-new-tokens", "4", "--seeds", "0",
            "--gen-batch-size", "25", "--mauve-kmeans-num-redo", "1", "--set", "training.use_cpu=true"]
    assert study.main(argv) == 0
    assert (out / "validation.txt").is_file() and (out / "calibration_set.txt").is_file()
    results = json.loads((out / "results.json").read_text())
    assert list(results["checkpoints"]) == ["no calibration", "MLE", "MLE, lr 1e-3"] and not results["missing"]
    for row in results["checkpoints"].values():
        assert row["perplexity"] > 1 and 0 < row["mauve"] <= 1 and row["mauve_num_samples"] == 50
        assert 0 < row["top_p0.95_mauve"] <= 1 and "top_p0.95_rep_2" in row  # the second decoding setting
    assert "**top_p0.95**" in (out / "results.md").read_text()
    sample = json.loads((out / "mle" / "samples.jsonl").read_text().splitlines()[0])
    assert {"prefix", "reference", "pure/seed0", "top_p0.95/seed0"} <= set(sample)
    lr = [json.loads((out / n / "emo_trainer_config.yaml").read_text().split("learning_rate:")[1].split()[0])
          for n in ("mle", "mle-lr1e-3")]
    assert lr == [5e-5, 1e-3], "a row's override reaches its run only"
    assert results["checkpoints"]["MLE"]["perplexity"] != results["checkpoints"]["MLE, lr 1e-3"]["perplexity"]
    # a re-run resumes: nothing is recomputed
    stamp = (out / "mle" / "eval.json").stat().st_mtime_ns
    model_stamp = (out / "mle" / "final" / "config.json").stat().st_mtime_ns
    assert study.main(argv) == 0 and (out / "mle" / "eval.json").stat().st_mtime_ns == stamp
    # fewer decoding settings: the results of the request, from the samples already there
    samples_stamp = (out / "mle" / "samples.jsonl").stat().st_mtime_ns
    assert study.main([*argv, "--decodings"]) == 0
    assert "top_p0.95_mauve" not in json.loads((out / "mle" / "eval.json").read_text())
    assert (out / "mle" / "samples.jsonl").stat().st_mtime_ns == samples_stamp
    # other generation settings: every model is sampled again, none calibrated again
    assert study.main([*argv, "--max-new-tokens", "5"]) == 0
    assert (out / "mle" / "samples.jsonl").stat().st_mtime_ns != samples_stamp
    assert (out / "mle" / "final" / "config.json").stat().st_mtime_ns == model_stamp


def test_study_mauve_later_equals_mauve_inline(corpus, tmp_path):
    """--no-mauve (e.g. on a GPU machine without mauve-text) then --stage score gives exactly the
    numbers of an inline evaluation, on a machine without the calibrated models (a GPU call brings
    back samples and results, not models): scoring never calibrates."""
    import json
    import random

    from emo_trainer import study

    _, base = corpus
    rng = random.Random(1)
    words = ["a", "team", "wanted", "the", "story", "to", "be", "more", "forgiving", "than", "the", "first", "game", "of", "the", "series"]
    (tmp_path / "test.raw").write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(52)) + "\n")

    def argv(out, *extra):
        return ["--output-dir", str(tmp_path / out), "--model", str(base), "--train-file", str(tmp_path / "wiki.train.tokens"),
                "--valid-file", str(tmp_path / "wiki.valid.raw"), "--test-file", str(tmp_path / "test.raw"),
                "--objectives", "none", "mle", "--sentences", "8", "--block-size", "16", "--batch-size", "2",
                "--prompt-words", "4", "--continuation-words", "4", "--max-new-tokens", "3", "--seeds", "0", "1",
                "--gen-batch-size", "26", "--mauve-kmeans-num-redo", "1", "--set", "training.use_cpu=true", *extra]

    assert study.main(argv("inline")) == 0
    assert study.main(argv("later", "--no-mauve")) == 0
    pending = json.loads((tmp_path / "later/none/eval.json").read_text())
    assert pending["mauve_pending"] and "mauve" not in pending and "top_p0.95_rep_2" in pending
    import shutil

    shutil.rmtree(tmp_path / "later/mle/final")  # scored elsewhere: the model stayed on the GPU machine
    assert study.main(argv("later", "--stage", "score")) == 0
    assert not (tmp_path / "later/mle/final").exists()
    for row in ("none", "mle"):
        inline, later = (json.loads((tmp_path / d / row / "eval.json").read_text()) for d in ("inline", "later"))
        for key in ("mauve", "mauve_std", "top_p0.95_mauve", "rep_2", "perplexity"):
            assert later[key] == inline[key], (row, key)
        assert "mauve_pending" not in later


def test_study_adds_seeds_and_decodings_unit_by_unit(corpus, tmp_path):
    """Adding a seed or a decoding setting samples only the new (decoding, seed) units; the result
    equals a study that asked for all of them at once, and an eval.json of the older layout (one
    per_seed list) resumes without sampling again."""
    import json
    import random

    from emo_trainer import study

    _, base = corpus
    rng = random.Random(2)
    words = ["the", "series", "was", "made", "by", "a", "team", "that", "wanted", "more", "of", "the", "first", "game"]
    (tmp_path / "test.raw").write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(52)) + "\n")

    def argv(out, *extra):
        return ["--output-dir", str(tmp_path / out), "--model", str(base), "--train-file", str(tmp_path / "wiki.train.tokens"),
                "--valid-file", str(tmp_path / "wiki.valid.raw"), "--test-file", str(tmp_path / "test.raw"),
                "--objectives", "none", "--sentences", "8", "--block-size", "16", "--prompt-words", "4",
                "--continuation-words", "4", "--max-new-tokens", "3", "--gen-batch-size", "26",
                "--mauve-kmeans-num-redo", "1", *extra]

    def read(out, name):
        return (tmp_path / out / "none" / name).read_text()

    assert study.main(argv("all", "--seeds", "0", "1")) == 0
    assert study.main(argv("step", "--seeds", "0", "--decodings")) == 0
    first = [json.loads(x)["pure/seed0"] for x in read("step", "samples.jsonl").splitlines()]
    # a report while the study is under way: the row from the units it has, each mean with its seed count
    assert study.main(argv("step", "--seeds", "0", "1", "--report-only")) == 0
    partial = json.loads((tmp_path / "step" / "results.json").read_text())
    row = partial["checkpoints"]["no calibration"]
    assert row["seeds"] == [0] and row["seeds_by_decoding"] == {"": [0]} and "top_p0.95_mauve" not in row
    assert partial["incomplete"] == {"none": ["pure/seed1", "top_p0.95/seed0", "top_p0.95/seed1"]}
    md = (tmp_path / "step" / "results.md").read_text()
    assert "| no calibration | " in md.split("**top_p0.95**")[0] and "| 1 |" in md.split("**top_p0.95**")[0]
    assert "| 0 | – |" in md.split("**top_p0.95**")[1]
    assert study.main(argv("step", "--seeds", "0", "1")) == 0  # adds pure/seed1, top_p0.95/seed0 and /seed1
    step, whole = json.loads(read("step", "eval.json")), json.loads(read("all", "eval.json"))
    assert [json.loads(x)["pure/seed0"] for x in read("step", "samples.jsonl").splitlines()] == first
    assert step["per_seed"] == whole["per_seed"] and step["perplexity"] == whole["perplexity"]
    for key in ("mauve", "mauve_std", "top_p0.95_mauve", "top_p0.95_rep_2"):
        assert step[key] == whole[key], key
    results = json.loads((tmp_path / "step" / "results.json").read_text())
    assert results["checkpoints"]["no calibration"]["per_seed"] == whole["per_seed"]
    # an eval.json written before units existed: the same results, nothing sampled again
    legacy = {k: v for k, v in step.items() if k not in ("units", "ppl")}
    (tmp_path / "step" / "none" / "eval.json").write_text(json.dumps(legacy))
    stamp = (tmp_path / "step" / "none" / "samples.jsonl").stat().st_mtime_ns
    assert study.main(argv("step", "--seeds", "0", "1")) == 0
    assert (tmp_path / "step" / "none" / "samples.jsonl").stat().st_mtime_ns == stamp
    again = json.loads(read("step", "eval.json"))
    assert again["per_seed"] == whole["per_seed"] and set(again["units"]) == set(step["units"])


def test_a_row_another_process_works_on_is_left_alone(corpus, tmp_path, capsys):
    """Two study commands on one directory: a row whose lock another process holds is reported
    (with that process's pid) and not touched; the other rows go on; once free, it runs."""
    import json
    import os

    from emo_trainer import study

    _, base = corpus
    (tmp_path / "test.raw").write_text("\n".join(f"the story {i} was more forgiving than the first game of the series" for i in range(52)) + "\n")
    argv = ["--output-dir", str(tmp_path / "s"), "--model", str(base), "--train-file", str(tmp_path / "wiki.train.tokens"),
            "--valid-file", str(tmp_path / "wiki.valid.raw"), "--test-file", str(tmp_path / "test.raw"),
            "--objectives", "none", "again=none", "--sentences", "8", "--block-size", "16", "--prompt-words", "4",
            "--continuation-words", "4", "--max-new-tokens", "3", "--seeds", "0", "--decodings", "--gen-batch-size", "26",
            "--no-mauve"]
    with study.row_lock(tmp_path / "s", "none"):
        assert study.main(argv) == 1
        results = json.loads((tmp_path / "s" / "results.json").read_text())
        assert results["missing"] == ["none"] and list(results["checkpoints"]) == ["again"]
        assert f"pid {os.getpid()}" in results["failed"]["none"] and "run the study again" in results["failed"]["none"]
        assert not (tmp_path / "s" / "none" / "eval.json").exists()
    assert study.main(argv) == 0
    assert (tmp_path / "s" / "none" / "eval.json").is_file()


def test_study_rows_parse_and_reject_bad_specs():
    from emo_trainer import study

    assert study.parse_row("emo") == study.Row("emo", "emo")
    assert study.parse_row("emo-m1=emo:emo.mode=1,emo.ratio_cap=3") == study.Row(
        "emo-m1", "emo", ("emo.mode=1", "emo.ratio_cap=3"))
    assert study.parse_row("emo:emo.mode=1").name == "emo_emo.mode-1"
    assert study.parse_row("emo-m1-lr1e-4=emo:training.learning_rate=1e-4").label == "EMO mode 1 (cap 3), lr 1e-4"
    assert study.parse_row("mle-lr2e-5=mle:training.learning_rate=2e-5").label == "MLE, lr 2e-5"
    assert study.parse_row("mine-lr2e-5=mle").label == "mine-lr2e-5"
    assert study.parse_row("mle-seed43=mle:training.seed=43").label == "MLE, training seed 43"
    assert study.parse_row("emo-m1-seed43=emo:training.seed=43").label == "EMO mode 1 (cap 3), training seed 43"
    for bad in ("emo:mode", ":emo.mode=1", "none:x=1", "a/b=mle"):
        with pytest.raises(ValueError, match="--objectives"):
            study.parse_row(bad)


def test_study_probe_measures_each_objective_against_mle(corpus, tmp_path):
    """--stage probe: per row, the cosine with the first row's gradient, the first AdamW step's
    held-out CE change and the held-out CE after real steps; the base model is left unchanged."""
    import json

    from emo_trainer import study

    _, base = corpus
    argv = ["--output-dir", str(tmp_path / "probe"), "--model", str(base), "--train-file", str(tmp_path / "wiki.train.tokens"),
            "--valid-file", str(tmp_path / "wiki.valid.raw"), "--test-file", str(tmp_path / "wiki.valid.raw"),
            "--objectives", "none", "mle", "mle-again=mle", "emo-m1=emo:emo.mode=1", "--sentences", "12",
            "--block-size", "8", "--stage", "probe", "--probe-steps", "2", "--probe-batch-size", "2",
            "--learning-rate", "1e-3"]
    assert study.main(argv) == 0
    probe = json.loads((tmp_path / "probe" / "probe.json").read_text())
    rows = probe["objectives"]
    assert list(rows) == ["mle", "mle-again", "emo-m1"]
    assert rows["mle"]["param_cos_with_first"] == pytest.approx(1.0, abs=1e-5)
    assert rows["mle-again"]["heldout_dce_first_step_per_lr"] == pytest.approx(rows["mle"]["heldout_dce_first_step_per_lr"])
    assert rows["mle-again"]["heldout_ce_after_steps"] == rows["mle"]["heldout_ce_after_steps"]  # model restored each time
    assert set(rows["mle"]["heldout_ce_after_steps"]) == {"1", "2"}
    assert {"ce", "demd", "weight"} <= set(rows["emo-m1"]["metrics"]) and rows["emo-m1"]["param_cos_with_first"] < 1


def test_paired_difference_verdicts_by_hand():
    """Δ MAUVE paired seed by seed, judged against twice the larger spread over seeds."""
    from emo_trainer import study

    def row(*mauve):
        return {"per_seed": [{"mauve": m} for m in mauve]}

    d = study.paired_difference(row(0.9, 0.8, 0.85), row(0.7, 0.72, 0.71))
    assert d["mean_difference"] == pytest.approx(0.14) and d["spread"] == pytest.approx(0.05)
    assert d["std_of_differences"] == pytest.approx(0.06) and d["seeds"] == 3 and d["verdict"] == "better"
    assert study.paired_difference(row(0.7, 0.72, 0.71), row(0.9, 0.8, 0.85))["verdict"] == "worse"
    assert study.paired_difference(row(0.86, 0.80, 0.83), row(0.84, 0.82, 0.83))["verdict"] == "within noise"
    assert study.paired_difference(row(0.9), row(0.8))["verdict"].startswith("one seed")
    assert study.paired_difference(row(), row(0.8)) is None
    # paired by seed number, not position: seeds 0 and 2 of a row against seeds 0, 1, 2
    partial = {"per_seed": [{"mauve": 0.9}, {"mauve": 0.7}], "seeds": [0, 2]}
    full = {"per_seed": [{"mauve": 0.8}, {"mauve": 0.1}, {"mauve": 0.6}], "seeds": [0, 1, 2]}
    d = study.paired_difference(partial, full)
    assert d["seeds"] == 2 and d["mean_difference"] == pytest.approx(0.1)
    # one seed of a row against a baseline with three: judged by the baseline's spread
    one = study.paired_difference({"per_seed": [{"mauve": 0.2}], "seeds": [1]}, full)
    assert one["mean_difference"] == pytest.approx(0.1) and one["spread"] == pytest.approx(0.13 ** 0.5)
    assert one["verdict"] == "within noise (one seed)"
    results = {"checkpoints": {"MLE": row(0.7, 0.72, 0.71), "EMO": row(0.9, 0.8, 0.85)}, "protocol": {"decodings": []}}
    table = study.verdict_table(results)
    assert "| EMO | pure sampling | 3 | +0.140 | 0.06 | 0.05 | better |" in table
    assert study.verdict_table({"checkpoints": {"EMO": row(0.9)}, "protocol": {}}) == ""
