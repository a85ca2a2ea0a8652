"""Token-weighted perplexity: hand-computed NLLs, ignore_index, vocabulary restriction, evaluate module."""

import math

import pytest
import torch

from emo_trainer.evaluation import metrics
from emo_trainer.evaluation.metrics.perplexity import dataloader_nll, perplexity_from_totals, sequence_nll


def test_uniform_logits_give_vocab_size():
    # uniform over V = 4: every target costs ln 4; labels are unshifted, so T = 5 gives 4 targets
    logits = torch.zeros(1, 5, 4)
    labels = torch.tensor([[0, 1, 2, 3, 0]])
    nll, n = sequence_nll(logits, labels)
    assert n.tolist() == [4]
    assert nll.item() == pytest.approx(4 * math.log(4))
    assert perplexity_from_totals(nll.item(), 4) == pytest.approx(4.0)


def test_ignore_index_and_known_probabilities():
    # position 0 predicts labels[1] = 1 with logits [ln 1, ln 3] -> p = 3/4; position 1's target is -100
    logits = torch.log(torch.tensor([[[1.0, 3.0], [1.0, 1.0], [1.0, 1.0]]]))
    labels = torch.tensor([[0, 1, -100]])
    nll, n = sequence_nll(logits, labels)
    assert n.item() == 1
    assert nll.item() == pytest.approx(-math.log(3 / 4))


def test_vocab_size_renormalises_extra_actions_away():
    # a 5th logit (e.g. a backspace action) that is excluded: back to uniform over 4
    logits = torch.zeros(1, 3, 5)
    logits[..., 4] = 10.0
    labels = torch.tensor([[1, 2, 3]])
    nll, _ = sequence_nll(logits, labels, vocab_size=4)
    assert nll.item() == pytest.approx(2 * math.log(4))


def test_token_weighted_not_mean_of_batch_means():
    # batch A: 1 token with NLL 2.0; batch B: 5 tokens with total NLL 4.0
    # token-weighted: (2 + 4) / 6 = 1.0; a mean of batch means would be (2.0 + 0.8) / 2 = 1.4
    ppl = metrics.load("perplexity")
    ppl.add_batch(nll_sum=[2.0], num_tokens=[1])
    ppl.add_batch(nll_sum=[4.0], num_tokens=[5])
    out = ppl.compute()
    assert out["nll"] == pytest.approx(1.0) and out["num_tokens"] == 6
    assert out["perplexity"] == pytest.approx(math.e)


def test_no_tokens_and_overflow():
    with pytest.raises(ValueError, match="no target tokens"):
        perplexity_from_totals(0.0, 0)
    assert perplexity_from_totals(1e6, 1) == math.inf


def test_dataloader_nll_matches_model_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
                                                bos_token_id=0, eos_token_id=0))
    ids = torch.randint(0, 50, (3, 12))
    labels = ids.clone()
    labels[2, 6:] = -100  # a shorter third sequence: token weighting matters
    batches = [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]
    nll, tokens = dataloader_nll(model, batches)
    assert tokens == 11 + 11 + 5
    assert model.training  # restored after the pass
    model.eval()  # the reference without dropout
    with torch.no_grad():
        # HF's loss is the token mean over one batch holding all three sequences
        expected = model(input_ids=ids, labels=labels).loss.item()
    assert nll / tokens == pytest.approx(expected, rel=1e-5)
    # labels are optional: built from input_ids and the attention mask
    mask = torch.ones_like(ids)
    _, tokens2 = dataloader_nll(model, [{"input_ids": ids[:2], "attention_mask": mask[:2]}])
    assert tokens2 == 22
