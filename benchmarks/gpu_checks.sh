#!/usr/bin/env bash
# The measurements that need one CUDA GPU and were still open when the last GPU session ended
# (docs/performance.md, docs/distributed.md "Pending"), in groups that each fit one ~10-minute
# call.  Results go to $OUT (default /tmp/gpu-checks); each group writes its own folder.
#
#   bash benchmarks/gpu_checks.sh perf       # SequenceMatch and EMO after the last unmeasured fixes (~4 min)
#   bash benchmarks/gpu_checks.sh kernels    # the Triton kernels on CUDA (tests/test_triton_cuda.py, ~1 min)
#   bash benchmarks/gpu_checks.sh numerics   # bf16 and fp16, every objective, 400 quickstart steps (~8 min)
#   bash benchmarks/gpu_checks.sh verify --call 1|2   # issue 15: benchmarks/gpu_verify.py (runbook: docs/distributed.md)
#
# What to look for is printed at the end of each group.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-checks}"
group="${1:?usage: gpu_checks.sh perf|kernels|numerics|verify}"
if [[ "$group" == verify ]]; then  # issue 15's checks, judged in code, results JSON/MD under $OUT
    shift; exec python3 benchmarks/gpu_verify.py --out "$OUT" "$@"
fi
case "$group" in perf|kernels|numerics) ;; *) echo "unknown group '$group': use perf, kernels or numerics" >&2; exit 2;; esac
mkdir -p "$OUT/$group"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/$group/gpu.txt" || true
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/$group/gpu.txt"

case "$group" in
perf)
    # GPT-2 B8×T1024 bf16: SequenceMatch with SDPA kept off cuDNN and rows padded to 8 nodes;
    # EMO with padded transport operands.  The profile shows whether cuDNN attention is gone.
    python benchmarks/benchmark.py --shape gpt2 --objectives sequencematch sequencematch+sampling emo mle \
        --profile --out "$OUT/perf/gpt2" 2>&1 | tee "$OUT/perf/gpt2.log"
    # V = 128256: chunked EMO with its transport matrix cached per dtype (was rebuilt every step).
    python benchmarks/benchmark.py --shape large-vocab --objectives mle emo \
        --out "$OUT/perf/large-vocab" 2>&1 | tee "$OUT/perf/large-vocab.log"
    grep -c "_cudnn_attention" "$OUT"/perf/gpt2/profile-sequencematch*.txt 2>/dev/null || true  # counts per file: want 0
    echo "Look for: sequencematch/full ≤ 1.25× builtin; no _cudnn_attention rows in its profile;"
    echo "          its extra peak memory not far above mle/full (a jump = the math SDPA kernel ran);"
    echo "          emo/full and emo/chunked below the previous 1.15× / 1.03×."
    ;;
kernels)
    TRITON_INTERPRET=0 python -m pytest -q -p no:cacheprovider tests/test_triton_cuda.py 2>&1 | tee "$OUT/kernels/pytest.log"
    echo "Look for: every test passed."
    ;;
numerics)
    for obj in mle emo mixce mile sequencematch; do
        for prec in bf16 fp16; do
            python scripts/train.py --config configs/quickstart.yaml --use_cpu false --$prec true \
                --objective "$obj" --max_steps 400 --eval_steps 200 --save_strategy no --eval.generation false \
                --output_dir "$OUT/numerics/$obj-$prec" > "$OUT/numerics/$obj-$prec.log" 2>&1 \
                && echo "ok     $obj $prec" || echo "FAILED $obj $prec (see $OUT/numerics/$obj-$prec.log)"
        done
    done | tee "$OUT/numerics/summary.txt"
    grep -l skipped_batches "$OUT"/numerics/*/trainer_state.json 2>/dev/null || true
    echo "Look for: ok everywhere, no file listed above (no skipped non-finite batch)."
    ;;
esac
