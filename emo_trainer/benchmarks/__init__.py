"""Benchmarks (not tests), run through ``benchmarks/*.py``:

* :mod:`.training_step` — step time and peak memory of every objective × loss path (``benchmarks/benchmark.py``);
* :mod:`.evaluation` — the cost of one generation evaluation (``benchmarks/bench_eval.py``);
* :mod:`.sequencematch` — a SequenceMatch step against an MLE step (``benchmarks/bench_sequencematch.py``).

Measured results are in ``docs/results/benchmark/`` and discussed in ``docs/performance.md``.
"""
