"""Tiny offline fixtures for the evaluation tests: a byte-level BPE tokenizer and a 1-layer GPT-2."""

from __future__ import annotations

from emo_trainer.quickstart_corpus import make_corpus


def documents(n: int, seed: int = 0) -> list[str]:
    """``n`` quickstart-corpus documents (each well over 100 words)."""
    return make_corpus(n, seed=seed)


def tiny_tokenizer(texts: list[str], vocab_size: int = 300):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")


def tiny_gpt2(tokenizer, seed: int = 0, n_positions: int = 64):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=n_positions,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config)
