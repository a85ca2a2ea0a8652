"""Data pipeline: packing, collator labels, carved validation split, clear errors."""

from __future__ import annotations

import pytest

from emo_trainer.config import DataConfig
from emo_trainer.data import (
    CausalLMCollator,
    DataError,
    calibration_set,
    detokenize_wikitext,
    load_raw_splits,
    split_sentences,
    tokenize_splits,
)


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_packing_makes_exact_blocks(tmp_path, tiny_tokenizer):
    f = _write(tmp_path, "train.txt", "\n".join(f"the small cat number {i} sat on the mat." for i in range(200)))
    cfg = DataConfig(train_files=[f], block_size=16, validation_split_percentage=10)
    raw = load_raw_splits(cfg, seed=0)
    assert set(raw) == {"train", "validation"} and len(raw["validation"]) == 20
    tok = tokenize_splits(raw, tiny_tokenizer, cfg)
    n_tokens = sum(len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in raw["train"]["text"])
    assert len(tok["train"]) == n_tokens // 16
    assert all(len(x) == 16 for x in tok["train"]["input_ids"])


def test_unpacked_with_eos_and_collator_labels(tmp_path, tiny_tokenizer):
    f = _write(tmp_path, "train.jsonl", '{"text": "Anna went home."}\n{"text": "Ben found a very old key near the river."}\n')
    cfg = DataConfig(train_files=[f], validation_files=[f], block_size=64, packing=False, add_eos=True)
    tok = tokenize_splits(load_raw_splits(cfg), tiny_tokenizer, cfg)
    eos = tiny_tokenizer.eos_token_id
    feats = list(tok["train"])
    assert all(x["input_ids"][-1] == eos for x in feats)
    batch = CausalLMCollator(pad_token_id=eos)(feats)
    short = min(range(2), key=lambda i: len(feats[i]["input_ids"]))
    n = len(feats[short]["input_ids"])
    # the real EOS is a label (trained on); padding (also EOS) is not
    assert batch["labels"][short, n - 1] == eos
    assert (batch["labels"][short, n:] == -100).all()
    assert (batch["attention_mask"][short, n:] == 0).all()


def test_builtin_quickstart_corpus():
    raw = load_raw_splits(DataConfig(dataset="builtin:quickstart"))
    assert len(raw["train"]) == 3000 and len(raw["validation"]) == 300
    assert raw["train"][0]["text"] == load_raw_splits(DataConfig(dataset="builtin:quickstart"))["train"][0]["text"]


@pytest.mark.parametrize(
    "setup,needle",
    [
        ("missing", "file not found"),
        ("empty", "no usable text"),
        ("column", "column 'body' not in"),
        ("short", "fewer than one block"),
        ("latin1", "not valid UTF-8"),
        ("ext", "unsupported file type"),
    ],
)
def test_data_errors(tmp_path, tiny_tokenizer, setup, needle):
    col = "text"
    if setup == "missing":
        files = [str(tmp_path / "nope.txt")]
    elif setup == "empty":
        files = [_write(tmp_path, "e.txt", "\n\n   \n")]
    elif setup == "column":
        files = [_write(tmp_path, "c.jsonl", '{"text": "hello there"}\n')]
        col = "body"
    elif setup == "short":
        files = [_write(tmp_path, "s.txt", "hi\nthere\n")]
    elif setup == "latin1":
        p = tmp_path / "l.txt"
        p.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
        files = [str(p)]
    else:
        files = [_write(tmp_path, "x.docx", "hello")]
    cfg = DataConfig(train_files=files, validation_files=files, text_column=col, block_size=64)
    with pytest.raises(DataError, match=needle):
        tokenize_splits(load_raw_splits(cfg), tiny_tokenizer, cfg)


def test_sentences_and_calibration_set():
    docs = [
        " = Valkyria Chronicles = ",
        "The game was released in 2011 . It sold well in Japan and abroad . Short one .",
        "An <unk> sentence is dropped here entirely . This sentence has enough words to stay .",
    ]
    docs = [detokenize_wikitext(d) for d in docs]
    assert docs[1].startswith("The game was released in 2011. It sold")
    sents = split_sentences(docs, min_words=5)
    assert "Short one." not in sents
    assert all("<unk>" not in s for s in sents)
    assert "This sentence has enough words to stay." in sents
    a = calibration_set(docs * 3, n=2, seed=1)
    b = calibration_set(docs * 3, n=2, seed=1)
    assert a == b and len(a) == 2
