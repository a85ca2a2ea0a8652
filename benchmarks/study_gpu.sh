#!/usr/bin/env bash
# The calibration study at full scale in ONE GPU call (docs/results.md, "Finishing the study on a GPU").
# The GPU machine has no mauve-text/faiss room next to the 60 MB base model, so this call calibrates
# every row and evaluates it WITHOUT MAUVE (perplexity on the whole test split, samples of every
# decoding and seed, repetition metrics); MAUVE is added afterwards on the CPU with --stage score.
#
# Before the call (here, where $EMO_TRAINER_ASSETS holds the model and data):
#   EMO_TRAINER_ASSETS=/path/to/assets bash benchmarks/gpu_stage.sh        # fills .local-data/gpu15/
# The call (device tool): carry [".local-data/gpu15/wheels-base", ".local-data/gpu15/model",
#   ".local-data/gpu15/wikitext"], timeout 600, command:
#   bash benchmarks/study_gpu.sh "$OUT" [ROW ...]          # default rows: ROWS below
# Afterwards (here): link the assets where the GPU machine had them (mkdir -p /tmp/assets/data;
# ln -s /path/to/gpt2-gutenberg-30m /tmp/assets/model; ln -s the three WikiText files into /tmp/assets/data),
# unpack $OUT/study-results.tar.xz into /tmp/study, run $OUT/score_command.txt (MAUVE on the CPU; the
# same arguments, so the study's settings match), then the same command with --report-only --docs-dir docs/results.
set -euo pipefail
t0=$(date +%s)
cd "$(dirname "$0")/.."
OUT="${1:?usage: study_gpu.sh OUT_DIR [ROW ...]}"; shift || true
STAGE=${STUDY_STAGE:-.local-data/gpu15}
ROWS=("$@")
if [[ ${#ROWS[@]} -eq 0 ]]; then
  # in order of what the verdict needs first: a row that does not finish before the deadline is
  # missing from the results, never half-written
  ROWS=(none mle emo-m1=emo:emo.mode=1,emo.ratio_cap=3 emo-m2=emo:emo.mode=2 mixce mile
        mle-lr2e-5=mle:training.learning_rate=2e-5 mle-lr1e-4=mle:training.learning_rate=1e-4
        emo-m1-lr2e-5=emo:emo.mode=1,emo.ratio_cap=3,training.learning_rate=2e-5
        emo-m1-lr1e-4=emo:emo.mode=1,emo.ratio_cap=3,training.learning_rate=1e-4
        emo-m2-lr2e-5=emo:emo.mode=2,training.learning_rate=2e-5
        emo-m2-lr1e-4=emo:emo.mode=2,training.learning_rate=1e-4)
  # every objective registered in this checkout that is not a row yet (e.g. dft tailr focal eaft)
  for name in $(python3 -c "import sys; sys.path.insert(0, '.'); from emo_trainer.objectives import available; print(' '.join(available()))"); do
    [[ " ${ROWS[*]} " == *" $name "* || " ${ROWS[*]} " == *" $name="* || $name == emo || $name == sequencematch ]] || ROWS+=("$name")
  done
  ROWS+=(sequencematch)  # the slowest (it samples during training): last
fi
[[ -n ${SKIP_INSTALL:-} ]] || python3 -m pip install -q --no-index --no-deps --target /tmp/site "$STAGE"/wheels-base/*.whl
export PYTHONPATH=$PWD:/tmp/site TOKENIZERS_PARALLELISM=false
A=/tmp/assets; mkdir -p $A/model $A/data
for f in "$STAGE"/model/*; do
  case $f in *.xz) xz -dc "$f" > $A/model/"$(basename "${f%.xz}")" ;; *) cp "$f" $A/model/ ;; esac
done
for f in "$STAGE"/wikitext/*; do
  case $f in *.xz) xz -dc "$f" > $A/data/"$(basename "${f%.xz}")" ;; *) cp "$f" $A/data/ ;; esac
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt" || true
S=/tmp/study
# SENTENCES / EVAL_ARGS shrink it for a dry run on a CPU (e.g. SENTENCES=40 EVAL_ARGS="--num-prompts 60 --max-new-tokens 4")
common=(--output-dir $S --config configs/calibrate_emo.yaml --model $A/model --train-file $A/data/wiki.train.tokens
        --valid-file $A/data/wiki.valid.raw --test-file $A/data/wiki.test.raw
        --sentences "${SENTENCES:-25000}" --learning-rate 5e-5 --block-size 256 --batch-size 16 --seed 42
        --set training.eval_strategy=steps training.eval_steps=40
        --seeds 0 1 2 --decodings top_p=0.95 --gen-batch-size 448 ${EVAL_ARGS:-} --objectives "${ROWS[@]}")
printf '%q ' python scripts/calibration_study.py "${common[@]}" --stage score > "$OUT/score_command.txt"
# Everything below runs against a deadline (BUDGET_S seconds after the script started, default 520, for a
# 600 s device call): the results are packed at the deadline or at the end, whichever comes first.
pack() {
  # results back: every row's eval.json, samples, train_info and trainer_state (logs), the calibration set's meta
  [[ -d $S ]] && (cd $S && tar -cJf "$OUT/study-results.tar.xz" --exclude='*/final' --exclude='*/checkpoint-*' \
     --exclude='*.npy' --exclude='*.tmp' --exclude=calibration_set.txt --exclude=validation.txt .) || true
  echo "packed: $(( $(date +%s) - t0 )) s" >> "$OUT/timing.txt"
  ls -la "$OUT"
}
trap pack EXIT
left=$(( ${BUDGET_S:-520} - ($(date +%s) - t0) ))
echo "study: $left s left for ${#ROWS[@]} rows, ${JOBS:-4} at a time" | tee -a "$OUT/timing.txt"
# calibrate and evaluate row by row (--stage all), JOBS rows at a time on the one GPU (a 30M model leaves it mostly idle);
# at the deadline `timeout` signals its whole process group, the pool's worker processes included
timeout --kill-after=10 "$left" python3 scripts/calibration_study.py "${common[@]}" --stage all --no-mauve \
  --jobs "${JOBS:-4}" --threads "${THREADS:-4}" > "$OUT/study.log" 2>&1 || echo "study: exit $? (124 = deadline)" >> "$OUT/timing.txt"
echo "study: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/timing.txt"
tail -n 80 "$OUT/study.log" > "$OUT/study-tail.log"; rm -f "$OUT/study.log"
