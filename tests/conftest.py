"""Shared fixtures: tiny models and tokenizers built locally (no network)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 300-token byte-level BPE trained on the quickstart corpus."""
    from emo_trainer.modeling import train_bpe_tokenizer
    from emo_trainer.quickstart_corpus import make_corpus

    return train_bpe_tokenizer(make_corpus(200, seed=1), vocab_size=300)


def make_tiny_gpt2(vocab_size: int = 300, seed: int = 0, n_layer: int = 1, n_embd: int = 32, n_positions: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=vocab_size, n_positions=n_positions,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2
