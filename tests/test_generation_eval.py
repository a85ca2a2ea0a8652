"""Sampling of continuations and the evaluation callback on a stock transformers.Trainer (tiny GPT-2, offline)."""

import logging
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import documents, tiny_gpt2, tiny_tokenizer

from emo_trainer.evaluation import GenerationEvalCallback, aggregate_seeds, build_generation_callback
from emo_trainer.evaluation.config import EvalConfig
from emo_trainer.evaluation.generation import generate_continuations, sample_continuations
from emo_trainer.evaluation.metrics.mauve import MauveSampleError
from emo_trainer.evaluation.prompts import build_prompts

# quickstart documents have 36-76 words: short prompts; MAUVE kept cheap
FAST = {"prompt_words": 8, "continuation_words": 24, "max_new_tokens": 8, "batch_size": 32,
        "mauve_featurizer": "hashing", "mauve_kmeans_num_redo": 1, "mauve_kmeans_max_iter": 50}


@pytest.fixture(scope="module")
def docs():
    return documents(120)


@pytest.fixture(scope="module")
def tok(docs):
    return tiny_tokenizer(docs[:60])


def test_sampling_is_seeded_and_leaves_state_alone(docs, tok):
    model = tiny_gpt2(tok)
    model.activation_checkpointing_enable()  # (transformers 5 name of gradient checkpointing)
    model.train()
    gen_config = model.generation_config
    cfg = EvalConfig(**FAST)
    prompts = [p.prefix for p in build_prompts(docs, 8, 24, 10)]
    rng = torch.get_rng_state()
    a = generate_continuations(model, tok, prompts, cfg, seed=0)
    assert torch.equal(rng, torch.get_rng_state())  # the training RNG stream is untouched
    assert model.training and model.is_activation_checkpointing and model.generation_config is gen_config
    assert len(a) == 10 and all(isinstance(t, str) for t in a)
    assert a == generate_continuations(model, tok, prompts, cfg, seed=0)
    assert a != generate_continuations(model, tok, prompts, cfg, seed=1)


def test_left_padded_batch_matches_one_at_a_time_and_ignores_checkpoint_defaults(docs, tok):
    model = tiny_gpt2(tok).eval()
    prompts = ["Anna", "Ben walked to the old mill and", "Clara found a key"]  # different lengths
    greedy = EvalConfig(**{**FAST, "top_k": 1, "max_new_tokens": 6})  # top-k 1 sampling = greedy
    batched = sample_continuations(model, tok, prompts, greedy)
    for prompt, text in zip(prompts, batched):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=tok.eos_token_id)
        assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    # a checkpoint's shipped generation defaults must not change the protocol
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.repetition_penalty = 50.0
    assert generate_continuations(model, tok, prompts, greedy) == batched
    assert model.generation_config.no_repeat_ngram_size == 1  # restored


def test_custom_sampler_hook(docs, tok):
    calls = []

    def backspace_sampler(model, tokenizer, prompts, config, *, seed=0):
        calls.append((len(prompts), seed))
        return [f"continuation of {p.split()[0]}" for p in prompts]

    model = tiny_gpt2(tok)
    texts = generate_continuations(model, tok, ["a b", "c d"], EvalConfig(**FAST), seed=3, sampler=backspace_sampler)
    assert texts == ["continuation of a", "continuation of c"] and calls == [(2, 3)]
    with pytest.raises(RuntimeError, match="returned 1 texts for 2 prompts"):
        generate_continuations(model, tok, ["a", "b"], EvalConfig(**FAST), sampler=lambda *a, **k: ["x"])


def test_aggregate_seeds():
    out = aggregate_seeds([{"mauve": 0.5, "rep_2": 0.1, "mauve_num_samples": 60},
                           {"mauve": 0.7, "rep_2": 0.3, "mauve_num_samples": 60}])
    assert out["mauve"] == pytest.approx(0.6) and out["rep_2"] == pytest.approx(0.2)
    # sample std (ddof = 1) of {0.5, 0.7}: sqrt(((-0.1)^2 + 0.1^2) / 1) = 0.1414...
    assert out["mauve_std"] == pytest.approx(math.sqrt(0.02))
    assert out["mauve_num_samples"] == 60 and "mauve_num_samples_std" not in out
    assert "mauve_std" not in aggregate_seeds([{"mauve": 0.5}])


def test_build_errors(docs, tok):
    with pytest.raises(ValueError, match="no eval document"):
        build_generation_callback(EvalConfig(**{**FAST, "prompt_words": 500}), docs, tok)
    with pytest.raises(MauveSampleError, match="at least 50"):
        build_generation_callback(EvalConfig(**{**FAST, "num_prompts": 20}), docs, tok)
    cb = build_generation_callback(EvalConfig(**{**FAST, "num_prompts": 20, "mauve": False}), docs, tok)
    assert len(cb.prompts) == 20
    with pytest.warns(UserWarning, match="only 3 eval documents"):
        build_generation_callback(EvalConfig(**{**FAST, "num_prompts": 20, "mauve": False}), docs[:3], tok)


def _lm_dataset(tok, texts, length=24):
    """Right-padded sequences of varying length; labels -100 on padding."""
    from datasets import Dataset

    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for t in texts:
        ids = tok(t)["input_ids"][:length]
        pad = length - len(ids)
        rows["input_ids"].append(ids + [tok.eos_token_id] * pad)
        rows["attention_mask"].append([1] * len(ids) + [0] * pad)
        rows["labels"].append(ids + [-100] * pad)
    return Dataset.from_dict(rows)


def _trainer(tmp_path, tok, docs, **args):
    from transformers import Trainer, TrainingArguments, default_data_collator

    train = _lm_dataset(tok, docs[:40])
    # 7 eval sequences of very different lengths, batches of 3: the last batch holds one sequence
    evalset = _lm_dataset(tok, [" ".join(d.split()[: 2 + 3 * i]) for i, d in enumerate(docs[40:47])])
    targs = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, eval_strategy="steps", eval_steps=2, per_device_train_batch_size=8,
        per_device_eval_batch_size=3, report_to=[], use_cpu=True, logging_steps=2, disable_tqdm=True,
        save_strategy="no", learning_rate=1e-3, **args,
    )
    return Trainer(model=tiny_gpt2(tok), args=targs, train_dataset=train, eval_dataset=evalset,
                   data_collator=default_data_collator, processing_class=tok)


GEN_KEYS = {"eval_mauve", "eval_mauve_num_samples", "eval_rep_2", "eval_rep_3", "eval_rep_4", "eval_diversity",
            "eval_seq_rep_4", "eval_distinct_1", "eval_distinct_2", "eval_mean_length", "eval_generation_runtime"}
REF_KEYS = {f"eval_ref_{k}" for k in ("rep_2", "rep_3", "rep_4", "diversity", "seq_rep_4", "distinct_1",
                                      "distinct_2", "mean_length")}


def test_callback_on_stock_trainer(tmp_path, docs, tok):
    trainer = _trainer(tmp_path, tok, docs, metric_for_best_model="eval_mauve", greater_is_better=True)
    with pytest.warns(UserWarning, match="noisy"):  # 60 prompts < 500: warned once, at construction
        cb = build_generation_callback(EvalConfig(**{**FAST, "num_prompts": 60}), docs, tok, trainer=trainer)
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("GenerationEvalCallback") == names.index("DefaultFlowCallback") + 1
    trainer.add_callback(cb)  # added a second time by mistake: still one generation pass per evaluation
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no MAUVE warning at every evaluation
        trainer.train()
        metrics = trainer.evaluate()

    assert GEN_KEYS | {"eval_perplexity", "eval_loss"} <= set(metrics)
    assert metrics["eval_mauve_num_samples"] == 60 and 0 <= metrics["eval_mauve"] <= 1
    assert trainer.state.best_metric is not None  # metric_for_best_model="eval_mauve" found its value

    history = trainer.state.log_history
    gen_logs = [h for h in history if "eval_mauve" in h]
    assert [h["step"] for h in gen_logs] == [2, 4, 4]  # steps 2 and 4 in training, then evaluate()
    assert all(GEN_KEYS <= set(h) for h in gen_logs)
    assert REF_KEYS <= set(gen_logs[0]) and not any(REF_KEYS & set(h) for h in gen_logs[1:])  # baseline once
    assert gen_logs[0]["eval_ref_mean_length"] == 24.0  # every reference continuation has 24 words

    # token-weighted perplexity over the eval set, computed independently, sequence by sequence
    model = trainer.model.eval()
    nll = tokens = 0.0
    with torch.no_grad():
        for row in trainer.eval_dataset:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            n = int((labels[0, 1:] != -100).sum())
            loss = model(input_ids=ids, attention_mask=torch.tensor([row["attention_mask"]]), labels=labels).loss
            nll, tokens = nll + loss.item() * n, tokens + n
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    # the stock eval_loss (a mean of batch means) is not that here
    assert abs(math.exp(metrics["eval_loss"]) - metrics["eval_perplexity"]) > 1e-3 * metrics["eval_perplexity"]
    assert cb.trainer is trainer


def test_callback_without_trainer_reference_and_several_seeds(tmp_path, docs, tok, caplog):
    trainer = _trainer(tmp_path, tok, docs)
    cfg = EvalConfig(**{**FAST, "num_prompts": 50, "seeds": (0, 1)})
    with pytest.warns(UserWarning):
        cb = GenerationEvalCallback(build_prompts(docs, 8, 24, 50), cfg, tok, compute_perplexity=False)
    trainer.add_callback(cb)  # plain add_callback: no trainer reference
    with caplog.at_level(logging.WARNING, logger="emo_trainer.evaluation"):
        metrics = trainer.evaluate()
    assert "no trainer" in caplog.text
    assert {"eval_mauve", "eval_mauve_std", "eval_rep_2_std", "eval_diversity_std"} <= set(metrics)
    assert "eval_perplexity" not in metrics
    assert "eval_mauve" in trainer.state.log_history[-1]


def test_perplexity_reported_by_the_trainer_is_not_recomputed(tmp_path, docs, tok):
    trainer = _trainer(tmp_path, tok, docs)
    cb = GenerationEvalCallback([], EvalConfig(**FAST), tok, trainer=trainer)
    metrics = {"eval_loss": 1.0, "eval_runtime": 0.1, "eval_perplexity": 123.0}
    cb.on_evaluate(trainer.args, trainer.state, trainer.control, metrics=metrics, model=trainer.model,
                   eval_dataloader=trainer.get_eval_dataloader())
    assert metrics["eval_perplexity"] == 123.0 and "eval_mauve" not in metrics  # no prompts: no generation
    # another prefix (e.g. a named eval dataset): keys follow it
    metrics = {"eval_wiki_loss": 1.0, "eval_wiki_runtime": 0.1}
    cb.on_evaluate(trainer.args, trainer.state, trainer.control, metrics=metrics, model=trainer.model,
                   eval_dataloader=trainer.get_eval_dataloader())
    assert "eval_wiki_perplexity" in metrics


def test_trl_trainer_if_installed(tmp_path, docs, tok):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, eval_strategy="steps", eval_steps=2,
                         per_device_train_batch_size=4, per_device_eval_batch_size=4, report_to=[], use_cpu=True,
                         save_strategy="no", max_length=32, disable_tqdm=True)
    data = Dataset.from_dict({"text": docs[:40]})
    trainer = trl.SFTTrainer(model=tiny_gpt2(tok), args=args, train_dataset=data, eval_dataset=data.select(range(8)),
                             processing_class=tok)
    with pytest.warns(UserWarning):
        build_generation_callback(EvalConfig(**{**FAST, "num_prompts": 50}), docs, tok, trainer=trainer)
    trainer.train()
    assert any("eval_mauve" in h for h in trainer.state.log_history)
