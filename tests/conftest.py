"""Shared fixtures: tiny models and tokenizers built locally (no network)."""

from __future__ import annotations

import os
import socket

# Triton (optional) runs its kernels with its CPU interpreter in the tests; the switch must be set
# before triton is imported, because triton.language's own helpers are jitted at import time.
# The library uses the kernels on CUDA tensors only; tests/test_triton_stats.py opts CPU tensors in.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def _tiny_tokenizer_dir(tmp_path_factory):
    from emo_trainer.modeling import train_bpe_tokenizer
    from emo_trainer.quickstart_corpus import make_corpus

    d = tmp_path_factory.mktemp("tiny_tokenizer")
    train_bpe_tokenizer(make_corpus(200, seed=1), vocab_size=300, save_dir=d)
    return d


@pytest.fixture
def tiny_tokenizer(_tiny_tokenizer_dir):
    """A 300-token byte-level BPE trained on the quickstart corpus (trained once; a fresh copy per
    test, so a test that adds a token, e.g. <bkspc>, cannot leak it into another)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_tiny_tokenizer_dir))


def make_tiny_gpt2(vocab_size: int = 300, seed: int = 0, n_layer: int = 1, n_embd: int = 32, n_positions: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=vocab_size, n_positions=n_positions,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2


@pytest.fixture(scope="module")
def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a module's process group (a fixed port can still be
    held by a previous run's lingering process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
