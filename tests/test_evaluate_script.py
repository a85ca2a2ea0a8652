"""scripts/evaluate.py (emo_trainer.evaluation.evaluate_cli) and the checkpoint helpers of
emo_trainer.evaluation.checkpoints on tiny local checkpoints and local text/jsonl files (offline)."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import documents, tiny_gpt2, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _script():
    from emo_trainer.evaluation import evaluate_cli

    return evaluate_cli


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
    assert len(res["protocol"]["eval_data_sha256"]) == 16  # lets compare.py tell data sets apart
    assert res["reference"]["ref_mean_length"] == 24.0
    assert set(res["checkpoints"]) == {str(setup / "ckpt0"), str(setup / "ckpt1")}
    for r in res["checkpoints"].values():
        assert len(r["per_seed"]) == 2 and r["mauve_num_samples"] == 50
        assert {"mauve", "mauve_std", "diversity", "diversity_std", "rep_2", "distinct_1", "mean_length"} <= set(r)
        assert r["mauve"] == pytest.approx((r["per_seed"][0]["mauve"] + r["per_seed"][1]["mauve"]) / 2)
        assert r["block_size"] == 32 and r["num_tokens"] == r["num_blocks"] * 31  # 31 targets per packed block
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        # a plain checkpoint, no run config: plain sampler, full softmax, objective unknown
        assert r["objective"] is None and "backspace_token_id" not in r
        assert r["sampler"] == "emo_trainer.evaluation.generation:sample_continuations" and r["perplexity_vocab"] == "full"
    a, b = res["checkpoints"].values()
    assert a["perplexity"] != b["perplexity"]


def test_decodings_each_under_its_name(setup):
    out = setup / "decodings.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rc = _script().main([str(setup / "ckpt0"), "--eval-files", str(setup / "eval.txt"), "--seeds", "0",
                             "--output", str(out), "--decodings", "top_p=0.9", "name=greedy,top_k=1", *COMMON])
    assert rc == 0
    r = json.loads(out.read_text())["checkpoints"][str(setup / "ckpt0")]
    for name in ("top_p0.9", "greedy"):
        assert 0 < r[f"{name}_mauve"] <= 1 and f"{name}_rep_2" in r and f"{name}_diversity" in r
    assert r["greedy_distinct_2"] < r["distinct_2"]  # top-k 1 repeats itself; pure sampling does not
    rc = _script().main([str(setup / "ckpt0"), "--eval-files", str(setup / "eval.txt"), "--output", str(out),
                         "--decodings", "top_p", *COMMON])
    assert rc == 2


def test_jsonl_column_and_perplexity_only(setup):
    out = setup / "ppl.json"
    rc = _script().main([str(setup / "ckpt0"), "--eval-files", str(setup / "eval.jsonl"), "--text-column", "body",
                         "--no-generation", "--output", str(out), *COMMON])
    assert rc == 0
    r = json.loads(out.read_text())["checkpoints"][str(setup / "ckpt0")]
    assert "mauve" not in r and r["perplexity"] > 1


def test_objective_from_the_run_config(setup, tmp_path):
    from emo_trainer.config import load_config

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for f in (setup / "ckpt0").iterdir():
        (run / "final" / f.name).write_bytes(f.read_bytes())
    load_config(ROOT / "configs" / "quickstart.yaml", ["--objective", "mixce"]).save(run / "emo_trainer_config.yaml")
    out = tmp_path / "r.json"
    assert _script().main([str(run / "final"), "--eval-files", str(setup / "eval.txt"), "--no-generation",
                           "--block-size", "32", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["checkpoints"][str(run / "final")]["objective"] == "mixce"


# --------------------------------------------------------------------------- SequenceMatch checkpoints


@pytest.fixture(scope="module")
def sm_ckpt(setup):
    """A tiny SequenceMatch checkpoint: <bkspc> added with add_backspace_token (recorded in config.json), its
    output row made large so that masking it matters, and 3 padding rows above it (a padded vocabulary:
    the training eval masks only the <bkspc> column, so "first N logits" is not the same number)."""
    from transformers import AutoTokenizer

    from emo_trainer.objectives.sequencematch.backspace import add_backspace_token

    tok = AutoTokenizer.from_pretrained(setup / "ckpt0")
    model = tiny_gpt2(tok, seed=3)
    model.resize_token_embeddings(len(tok) + 4, mean_resizing=False)  # rows: vocab, <bkspc>, 3 padding rows
    bk = add_backspace_token(model, tok)
    assert bk == len(tok) - 1 and model.get_input_embeddings().weight.shape[0] == bk + 4
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        w = model.get_output_embeddings().weight
        w[bk] = 3.0 * torch.randn(w.shape[1], generator=g)
        w[bk + 1:] = 0.5 * torch.randn(3, w.shape[1], generator=g)
    d = setup / "sm"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, bk


def _eval_documents(setup) -> list[str]:
    return [line for line in (setup / "eval.txt").read_text().splitlines() if line.strip()]


def _manual_perplexity(ckpt, docs, column_mask=None, vocab_size=None) -> float:
    """exp(Σ NLL / Σ tokens) over the packed 32-token blocks, computed here without the script."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emo_trainer.config import DataConfig
    from emo_trainer.data import tokenize_splits

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    blocks = tokenize_splits(datasets.DatasetDict({"v": datasets.Dataset.from_dict({"text": docs})}), tok,
                             DataConfig(block_size=32))["v"]
    ids = torch.tensor(blocks["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if column_mask is not None:
        logits[..., column_mask] = float("-inf")
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="sum")
    return math.exp(nll.item() / ids[:, 1:].numel())


def test_sequencematch_perplexity_as_in_training(setup, sm_ckpt, tmp_path, caplog):
    """Default for a backspace checkpoint: the number ObjectiveTrainer(objective=sequencematch) reports."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from emo_trainer.config import DataConfig
    from emo_trainer.data import CausalLMCollator, tokenize_splits
    from emo_trainer.trainer import ObjectiveTrainer

    ckpt, bk = sm_ckpt
    docs = _eval_documents(setup)
    script = _script()
    base = [str(ckpt), "--eval-files", str(setup / "eval.txt"), "--no-generation", "--block-size", "32"]
    with caplog.at_level("INFO", logger="emo_trainer.evaluate"):
        assert script.main([*base, "--output", str(tmp_path / "a.json")]) == 0
    assert f"SequenceMatch checkpoint (model.config.backspace_token_id = {bk})" in caplog.text
    r = json.loads((tmp_path / "a.json").read_text())["checkpoints"][str(ckpt)]
    assert r["objective"] == "sequencematch" and r["backspace_token_id"] == bk
    assert r["perplexity_vocab"] == f"original vocabulary (<bkspc> = {bk} masked)"

    tok = AutoTokenizer.from_pretrained(ckpt)
    blocks = tokenize_splits(datasets.DatasetDict({"v": datasets.Dataset.from_dict({"text": docs})}), tok,
                             DataConfig(block_size=32))["v"]
    trainer = ObjectiveTrainer(
        model=AutoModelForCausalLM.from_pretrained(ckpt), objective="sequencematch", eval_dataset=blocks,
        args=TrainingArguments(output_dir=str(tmp_path / "t"), per_device_eval_batch_size=8, report_to=[],
                               use_cpu=True, disable_tqdm=True),
        data_collator=CausalLMCollator(tok.eos_token_id), processing_class=tok,
    )
    training_eval = trainer.evaluate()["eval_perplexity"]
    assert r["perplexity"] == pytest.approx(training_eval, rel=1e-5)
    assert r["perplexity"] == pytest.approx(_manual_perplexity(ckpt, docs, column_mask=bk), rel=1e-5)

    # the old behaviour (every logit in the softmax) is a clearly different number
    full = _manual_perplexity(ckpt, docs)
    assert full > 1.05 * r["perplexity"]

    # --perplexity-vocab-size N overrides: softmax over the first N logits (here: without the padding rows too)
    assert script.main([*base, "--perplexity-vocab-size", str(bk), "--output", str(tmp_path / "b.json")]) == 0
    r_sliced = json.loads((tmp_path / "b.json").read_text())["checkpoints"][str(ckpt)]
    assert r_sliced["perplexity"] == pytest.approx(_manual_perplexity(ckpt, docs, vocab_size=bk), rel=1e-5)
    assert r_sliced["perplexity_vocab"] == f"first {bk} logits (--perplexity-vocab-size)"
    assert abs(r_sliced["perplexity"] - r["perplexity"]) > 1e-3 * r["perplexity"]


def test_sequencematch_generation_uses_the_backspace_sampler(setup, sm_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emo_trainer.evaluation.config import EvalConfig
    from emo_trainer.evaluation.generation import generate_continuations, sample_continuations
    from emo_trainer.evaluation.metrics.repetition import repetition_metrics
    from emo_trainer.evaluation.prompts import build_prompts
    from emo_trainer.objectives.sequencematch.sampler import sample_continuations_with_backspace

    ckpt, _ = sm_ckpt
    flags = ["--eval-files", str(setup / "eval.txt"), "--no-perplexity", "--num-prompts", "20", "--max-new-tokens",
             "8", "--eval", "prompt_words=8", "--eval", "continuation_words=24", "--eval", "mauve=false"]
    script = _script()
    assert script.main([str(ckpt), *flags, "--output", str(tmp_path / "bk.json")]) == 0
    assert script.main([str(ckpt), *flags, "--sampler", "emo_trainer.evaluation.generation:sample_continuations",
                        "--output", str(tmp_path / "plain.json")]) == 0
    bk_run = json.loads((tmp_path / "bk.json").read_text())["checkpoints"][str(ckpt)]
    plain_run = json.loads((tmp_path / "plain.json").read_text())["checkpoints"][str(ckpt)]
    assert bk_run["sampler"] == "emo_trainer.objectives.sequencematch.sampler:sample_continuations_with_backspace"
    assert plain_run["sampler"] == "emo_trainer.evaluation.generation:sample_continuations"

    # the same numbers as sampling directly with each sampler
    model, tok = AutoModelForCausalLM.from_pretrained(ckpt).eval(), AutoTokenizer.from_pretrained(ckpt)
    cfg = EvalConfig(num_prompts=20, prompt_words=8, continuation_words=24, max_new_tokens=8, mauve=False)
    prefixes = [p.prefix for p in build_prompts(_eval_documents(setup), 8, 24, 20)]
    for run, sampler in ((bk_run, sample_continuations_with_backspace), (plain_run, sample_continuations)):
        expected = repetition_metrics(generate_continuations(model, tok, prefixes, cfg, seed=0, sampler=sampler))
        assert run["per_seed"][0] == pytest.approx(expected)
    assert bk_run["per_seed"][0] != pytest.approx(plain_run["per_seed"][0])


# --------------------------------------------------------------------------- user errors


def _no_model_loading(script, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a user error must be reported before any model or data is loaded")

    monkeypatch.setattr(script, "load_checkpoint", fail)
    monkeypatch.setattr(script, "read_documents", fail)


FIX_FEATURIZER = ("pass --featurizer with a local model directory, or --featurizer hashing (offline n-gram "
                  "featurizer), or --eval mauve=false")

# id → (extra argv (CKPT, EVAL, TMP substituted), the exact error line)
EARLY_ERRORS = {
    "eval_not_int": (["--eval", "num_prompts=abc"], "error: eval.num_prompts: expected an integer, got 'abc'"),
    "eval_not_bool": (["--eval", "mauve=maybe"], "error: eval.mauve: expected true or false, got 'maybe'"),
    "eval_not_float": (["--eval", "temperature=hot"], "error: eval.temperature: expected a number, got 'hot'"),
    "eval_out_of_range": (["--eval", "top_p=1.5"], "error: eval.top_p: must be in (0, 1], got 1.5"),
    "eval_no_seeds": (["--eval", "seeds=[]"], "error: eval.seeds: give at least one sampling seed"),
    "eval_negative_flag": (["--num-prompts", "-3"],
                           "error: eval.num_prompts: must be >= 0 (0 = no generation), got -3"),
    "eval_no_equals": (["--eval", "num_prompts"],
                       ("error: --eval num_prompts: expected KEY=VALUE with KEY an eval: key, e.g. --eval "
                       "num_prompts=200")),
    "eval_unknown_key": (["--eval", "num_promts=1"],
                         ("error: unknown key 'eval.num_promts' (did you mean num_prompts?); valid keys: generation, "
                         "num_prompts, prompt_words, continuation_words, max_new_tokens, temperature, top_k, top_p, decodings, "
                         "batch_size, seeds, mauve, mauve_featurizer, mauve_max_text_length, mauve_scaling_factor, "
                         "mauve_kmeans_seed, mauve_kmeans_num_redo, mauve_kmeans_max_iter, mauve_pooling, "
                         "mauve_device, featurizer_batch_size")),
    "eval_file_missing": (["--eval-files", "TMP/nope.txt"], "error: --eval-files: file not found: TMP/nope.txt"),
    "eval_file_format": (["--eval-files", "TMP/notes.docx"],
                         ("error: --eval-files: use files of one format among .csv, .json, .jsonl, .parquet, .raw, "
                         ".text, .tokens, .txt; got .docx")),
    "block_size": (["--block-size", "1"], "error: --block-size: must be at least 2 tokens, got 1"),
    "sampler_module": (["--sampler", "no_such_module:f"],
                       ("error: --sampler no_such_module:f: cannot import no_such_module (No module named "
                       "'no_such_module')")),
    "sampler_function": (["--sampler", "emo_trainer.evaluation.generation:nope"],
                         "error: --sampler emo_trainer.evaluation.generation:nope: emo_trainer.evaluation.generation has no function nope"),
    "featurizer_offline": (["--featurizer", "emo-trainer-test/no-such-featurizer"], None),  # checked below
    "featurizer_not_a_model": (["--featurizer", "TMP"],
                               (f"error: MAUVE featurizer 'TMP': not a model directory (no config.json); "
                               f"{FIX_FEATURIZER}")),
    "output_is_dir": (["--output", "TMP"], ("error: --output TMP: is a directory; give a file name, e.g. "
                                           "TMP/results.json")),
    "missing_config": (["--config", "TMP/nope.yaml"], "error: config file not found: TMP/nope.yaml"),
}


@pytest.mark.parametrize("case", list(EARLY_ERRORS))
def test_user_errors_one_line_exit_2_before_loading(case, setup, tmp_path, capsys, monkeypatch):
    extra, line = EARLY_ERRORS[case]
    (tmp_path / "notes.docx").write_text("x")
    extra = [a.replace("TMP", str(tmp_path)) for a in extra]
    argv = [str(setup / "ckpt0"), "--eval-files", str(setup / "eval.txt"), "--output", str(tmp_path / "x.json"),
            *extra]
    script = _script()
    _no_model_loading(script, monkeypatch)
    capsys.readouterr()
    assert script.main(argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1
    if case == "featurizer_offline":  # the hub library's own reason sits in the parentheses
        assert err[0].startswith("error: MAUVE featurizer 'emo-trainer-test/no-such-featurizer' "
                                 "(eval.mauve_featurizer): not a local directory and not loadable from the Hugging "
                                 "Face Hub (")
        assert err[0].endswith(f"); {FIX_FEATURIZER}")
    else:
        assert err[0] == line.replace("TMP", str(tmp_path))


def test_checkpoint_path_errors(setup, tmp_path, capsys, monkeypatch):
    script = _script()
    _no_model_loading(script, monkeypatch)
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    out = ["--output", str(tmp_path / "x.json")]
    cases = [
        # a missing checkpoint says so, with or without --eval-files (it used to say "no eval data" / "no tokenizer")
        ([str(tmp_path / "nope" / "final"), *out],
         (f"error: checkpoint {tmp_path / 'nope' / 'final'}: no such directory; pass a run's final/ or checkpoint-N/ "
         "folder")),
        ([str(tmp_path / "nope" / "final"), "--eval-files", str(setup / "eval.txt"), *out],
         (f"error: checkpoint {tmp_path / 'nope' / 'final'}: no such directory; pass a run's final/ or checkpoint-N/ "
         "folder")),
        ([str(run), *out],
         (f"error: checkpoint {run}: no config.json, not a model directory (did you mean {run / 'final'}?); pass a "
         "run's final/ or checkpoint-N/ folder")),
        ([str(tmp_path / "adapter"), *out],
         (f"error: checkpoint {tmp_path / 'adapter'}: a LoRA adapter, not a full model; merge it first: python "
         f"scripts/merge_lora.py {tmp_path / 'adapter'} MERGED_DIR")),
        ([str(setup / "ckpt0"), *out],
         ("error: no eval data: pass --eval-files, or --config (or a checkpoint inside a run directory, next to its "
         "emo_trainer_config.yaml)")),
    ]
    for argv, line in cases:
        capsys.readouterr()
        assert script.main(argv) == 2, argv
        assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")] == [line]


def test_late_user_errors(setup, tmp_path, capsys):
    """Errors that need the data or the checkpoint: still one line and exit 2."""
    script = _script()
    (tmp_path / "notok").mkdir()
    tiny_gpt2(__import__("transformers").AutoTokenizer.from_pretrained(setup / "ckpt0")).save_pretrained(
        tmp_path / "notok")
    out = ["--output", str(tmp_path / "x.json"), "--featurizer", "hashing"]
    cases = [
        ([str(setup / "ckpt0"), "--eval-files", str(setup / "eval.jsonl"), "--text-column", "text", *out],
         "error: --text-column: no column 'text' in --eval-files (columns: body); pass --text-column NAME"),
        ([str(tmp_path / "notok"), "--eval-files", str(setup / "eval.txt"), "--no-generation", *out],
         (f"error: checkpoint {tmp_path / 'notok'}: no tokenizer found (tried {tmp_path / 'notok'}, "
         f"{tmp_path / 'notok' / 'tokenizer'}, {tmp_path / 'tokenizer'}); pass --tokenizer")),
        ([str(setup / "ckpt0"), "--eval-files", str(setup / "eval.txt"), *out],  # documents of 30-80 words
         "error: no eval document has 20 + 80 words; lower eval.prompt_words / eval.continuation_words"),
        ([str(setup / "ckpt0"), "--eval-files", str(setup / "eval.txt"), "--num-prompts", "10", "--eval",
          "prompt_words=8", "--eval", "continuation_words=24", *out],
         "error: MAUVE needs at least 50 texts per side, got 10 (p) and 10 (q)"),
    ]
    for argv, line in cases:
        capsys.readouterr()
        assert script.main(argv) == 2, argv
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert len(err) == 1 and err[0].startswith(line), err


def test_error_from_the_command_line_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(tmp_path / "runs/nope/final"),
                           "--output", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        (f"error: checkpoint {tmp_path / 'runs/nope/final'}: no such directory; pass a run's final/ or checkpoint-N/ "
        "folder")]


# --------------------------------------------------------------------------- the library functions


def test_load_checkpoint_and_sequencematch_detection(setup, sm_ckpt):
    from emo_trainer.errors import CheckpointError
    from emo_trainer.evaluation.checkpoints import backspace_id, is_sequencematch_checkpoint, load_checkpoint

    ckpt, bk = sm_ckpt
    model, tok = load_checkpoint(ckpt, device="cpu")
    assert not model.training and len(tok) == bk + 1 and tok.pad_token is not None
    # from the directory (config.json, nothing loaded), from the loaded model, from the tokenizer alone
    assert backspace_id(ckpt) == backspace_id(model) == bk and is_sequencematch_checkpoint(str(ckpt))
    model.config.backspace_token_id = None
    assert backspace_id(model) is None and backspace_id(model, tok) == bk
    assert not is_sequencematch_checkpoint(setup / "ckpt0")
    assert not is_sequencematch_checkpoint(load_checkpoint(setup / "ckpt0", device="cpu")[0])
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint(setup / "nope")


def test_document_perplexity_matches_a_manual_computation(setup, sm_ckpt):
    from emo_trainer.evaluation.checkpoints import document_perplexity, load_checkpoint, read_documents

    docs = read_documents([setup / "eval.txt"])
    assert docs == _eval_documents(setup)
    model, tok = load_checkpoint(setup / "ckpt0", device="cpu")
    r = document_perplexity(model, tok, docs, block_size=32)
    assert r["perplexity"] == pytest.approx(_manual_perplexity(setup / "ckpt0", docs), rel=1e-5)
    assert r["num_tokens"] == r["num_blocks"] * 31 and r["block_size"] == 32
    assert document_perplexity(model, tok, docs, block_size=32, max_blocks=2)["num_blocks"] == 2
    # a SequenceMatch model: the <bkspc> column is masked by default ("auto"), not with backspace=None
    ckpt, bk = sm_ckpt
    model, tok = load_checkpoint(ckpt, device="cpu")
    masked = document_perplexity(model, tok, docs, block_size=32)["perplexity"]
    assert masked == pytest.approx(_manual_perplexity(ckpt, docs, column_mask=bk), rel=1e-5)
    full = document_perplexity(model, tok, docs, block_size=32, backspace=None)["perplexity"]
    assert full == pytest.approx(_manual_perplexity(ckpt, docs), rel=1e-5)
