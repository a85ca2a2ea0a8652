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
cd "$(dirname "$0")/.."
OUT="${1:?usage: study_gpu.sh OUT_DIR [ROW ...]}"; shift || true
STAGE=${STUDY_STAGE:-.local-data/gpu15}
ROWS=("$@")
if [[ ${#ROWS[@]} -eq 0 ]]; then
  ROWS=(none mle emo-m1=emo:emo.mode=1,emo.ratio_cap=3 emo-m2=emo:emo.mode=2 mixce mile sequencematch
        mle-lr2e-5=mle:training.learning_rate=2e-5 mle-lr1e-4=mle:training.learning_rate=1e-4
        emo-m1-lr2e-5=emo:emo.mode=1,emo.ratio_cap=3,training.learning_rate=2e-5
        emo-m1-lr1e-4=emo:emo.mode=1,emo.ratio_cap=3,training.learning_rate=1e-4
        emo-m2-lr2e-5=emo:emo.mode=2,training.learning_rate=2e-5
        emo-m2-lr1e-4=emo:emo.mode=2,training.learning_rate=1e-4)
  # every objective registered in this checkout that is not a row yet (e.g. dft tailr focal eaft)
  for name in $(python3 -c "import sys; sys.path.insert(0, '.'); from emo_trainer.objectives import available; print(' '.join(available()))"); do
    [[ " ${ROWS[*]} " == *" $name "* || " ${ROWS[*]} " == *" $name="* || $name == emo ]] || ROWS+=("$name")
  done
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
        --seeds 0 1 2 --decodings top_p=0.95 --gen-batch-size 448 ${EVAL_ARGS:-} --objectives "${ROWS[@]}")
printf '%q ' python scripts/calibration_study.py "${common[@]}" --stage score > "$OUT/score_command.txt"
start=$(date +%s)
python3 scripts/calibration_study.py "${common[@]}" --stage calibrate 2>&1 | tail -n 40 > "$OUT/calibrate.log" || true
echo "calibrate: $(( $(date +%s) - start )) s" | tee -a "$OUT/timing.txt"
python3 scripts/calibration_study.py "${common[@]}" --stage evaluate --no-mauve 2>&1 | tail -n 60 > "$OUT/evaluate.log" || true
echo "evaluate (no MAUVE): $(( $(date +%s) - start )) s" | tee -a "$OUT/timing.txt"
# results back: every row's eval.json, samples, train_info and trainer_state (logs), the calibration set's meta
(cd $S && tar -cJf "$OUT/study-results.tar.xz" --exclude='*/final' --exclude='*/checkpoint-*' \
   --exclude='*.npy' --exclude=calibration_set.txt --exclude=validation.txt .)
ls -la "$OUT"
