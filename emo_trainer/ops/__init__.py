"""Kernels: the numerical machinery under the objectives' formulas.

* :mod:`.fused` — per-position softmax statistics (CE, entropy, EMO's transport cost) as one
  custom autograd Function, in row blocks, in PyTorch;
* :mod:`.triton_stats` — the same statistics as Triton kernels (CUDA; used by :mod:`.fused`
  when available);
* :mod:`.chunked` — the chunked path: hidden states → vocabulary projection → statistics, a
  chunk of positions at a time, so that the full N×V logits never exist.

The objectives (:mod:`emo_trainer.objectives`) hold only the math and call these.
"""
