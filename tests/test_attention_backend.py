"""SequenceMatch keeps SDPA off cuDNN for its tree masks (emo_trainer/objectives/sequencematch/attention.py).

The slowdown itself needs a GPU (measured on an H100: docs/performance.md); what CPU tests can
check is that the training forward, its backward and the backspace sampler run inside the
restriction, and that the restriction changes no numbers.
"""

from __future__ import annotations

import copy

import torch
from conftest import make_tiny_gpt2
from transformers import TrainingArguments

from emo_trainer.objectives import get_objective
from emo_trainer.objectives.sequencematch import attention


def _cudnn_allowed() -> bool:
    return torch.backends.cuda.cudnn_sdp_enabled()


def test_context_turns_off_only_cudnn():
    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
              torch.backends.cuda.math_sdp_enabled(), _cudnn_allowed())
    with attention.sdpa_without_cudnn():
        assert not _cudnn_allowed()
        assert torch.backends.cuda.flash_sdp_enabled() == before[0]
        assert torch.backends.cuda.mem_efficient_sdp_enabled() == before[1]
        assert torch.backends.cuda.math_sdp_enabled() == before[2]
    assert _cudnn_allowed() == before[3]  # restored


def test_default_objectives_choose_nothing():
    for name in ("mle", "emo", "mixce", "mile"):
        with get_objective(name).forward_context():
            assert _cudnn_allowed() == torch.backends.cuda.cudnn_sdp_enabled()


def test_sequencematch_forward_and_sampler_run_without_cudnn(tmp_path, tiny_tokenizer, monkeypatch):
    from emo_trainer.data import CausalLMCollator
    from emo_trainer.objectives.sequencematch.backspace import add_backspace_token
    from emo_trainer.trainer import ObjectiveTrainer

    model = make_tiny_gpt2(vocab_size=300)
    tok = copy.deepcopy(tiny_tokenizer)
    add_backspace_token(model, tok)
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(_cudnn_allowed())
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = ObjectiveTrainer(model=model, args=args, objective="sequencematch", processing_class=tok,
                               objective_options={"sample_every": 0, "noise_rate": 0.3, "seed": 0})
    ids = tok("the small fox ran over the hill and the bird sang", return_tensors="pt")["input_ids"]
    batch = CausalLMCollator(pad_token_id=0)([{"input_ids": ids[0].tolist()}] * 2)
    loss = trainer.compute_loss(model, batch)
    assert seen and not any(seen)  # every attention call of the forward ran without cuDNN
    loss.backward()
    seen.clear()
    from emo_trainer.objectives.sequencematch.sampler import generate_with_backspace

    generate_with_backspace(model, ids, torch.ones_like(ids), backspace_token_id=model.config.backspace_token_id,
                            max_new_tokens=3)
    assert seen and not any(seen)
    assert _cudnn_allowed()  # restored afterwards
