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
    assert cfg.objective.selected_options()["cost_embedding"] == "initial"
    t = cfg.training
    assert t["learning_rate"] == 2e-5 and t["num_train_epochs"] == 1 and t["warmup_steps"] == 0.03
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
    import importlib.util

    spec = importlib.util.spec_from_file_location("calibration_study", ROOT / "scripts/calibration_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    parse = study.make_parser().parse_args
    out = tmp_path / "study"
    out.mkdir()
    base = ["--output-dir", str(out), "--sentences", "200", "--objectives", "none", "mle"]
    assert study.check_settings(parse(base), out) is None
    assert (out / "study_settings.json").is_file()
    assert study.check_settings(parse([*base, "emo", "--jobs", "2"]), out) is None  # more objectives, more jobs
    problem = study.check_settings(parse([*base[:3], "150", "--learning-rate", "1e-4"]), out)
    assert "--sentences 200 → 150" in problem and "--learning-rate 5e-05 → 0.0001" in problem


def test_study_validation_text_is_detokenized_like_training(tmp_path):
    import importlib.util

    from emo_trainer.data import detokenize_wikitext

    spec = importlib.util.spec_from_file_location("calibration_study", ROOT / "scripts/calibration_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    raw = tmp_path / "valid.raw"
    raw.write_text(" = Title = \n The well @-@ known song , \" Hey \" , was 1 @,@ 000 years old . \n")
    args = study.make_parser().parse_args(["--valid-file", str(raw)])
    path = study.validation_file(args, tmp_path, write=True)
    want = [detokenize_wikitext(x) for x in raw.read_text().splitlines()]
    assert path.read_text().splitlines() == want and "well-known" in want[1]
    assert f"--data.validation_files=[{path}]" in study.calibration_overrides(args, "mle", tmp_path)
    off = study.make_parser().parse_args(["--valid-file", str(raw), "--detokenize", "none"])
    assert study.validation_file(off, tmp_path) == raw
