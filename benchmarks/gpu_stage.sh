#!/usr/bin/env bash
# Stage what the GPU calls of benchmarks/gpu_verify.py carry (issue 15) into the git-ignored
# .local-data/gpu15/, then print each call's payload against the 64 MiB a call may carry.
# Run it here (where pip reaches PyPI and $EMO_TRAINER_ASSETS exists), from the checkout the GPU session calls from:
#
#   bash benchmarks/gpu_stage.sh            # all groups (a few minutes: deepspeed is built as a wheel, the model xz'd)
#   bash benchmarks/gpu_stage.sh --sizes    # only print the payloads
#
# Groups (folders under .local-data/gpu15/):
#   wheels-base   datasets, dill, multiprocess                      (every call: data loading, trl)
#   wheels-mauve  evaluate, mauve-text, faiss-cpu                   (call 1: MAUVE at evaluation)
#   wheels-ds     deepspeed (pure Python, ops JIT-built there) + hjson, pydantic and its dependencies (call 1)
#   wheels-bench  cut-cross-entropy, trl, liger-kernel              (call 3: benchmark peers)
#   tokenizer     the base model's tokenizer.json + tokenizer_config.json (call 1: fresh GPT-2s)
#   wikitext      WikiText-2 train (tokenized), valid and test (raw), xz-compressed
#   model         the base model $EMO_TRAINER_ASSETS/models/gpt2-gutenberg-30m, model.safetensors xz-compressed (call 2)
# The wheels come from $EMO_TRAINER_ASSETS/tools/gpu-wheels (the versions it pins), run in a scratch git repository
# because it writes .git/info/exclude, which a git worktree does not have as a folder.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(git rev-parse --show-toplevel)
cd "$root"
stage=.local-data/gpu15
shared=${EMO_TRAINER_ASSETS:?set EMO_TRAINER_ASSETS to the folder holding models/gpt2-gutenberg-30m, data/wikitext-2* and tools/gpu-wheels}
tool=${GPU_WHEELS:-$shared/tools/gpu-wheels}
LIGER=${LIGER:-liger-kernel==0.8.5}

sizes() {
  local tree
  tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
  tree=$((tree + $(git ls-files -z --others --exclude-standard | xargs -0 -r stat -c %s | awk '{s+=$1} END {print s+0}')))
  python3 - "$tree" "$stage" "$here" <<'EOF'
import json, subprocess, sys
from pathlib import Path
tree, stage = int(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(Path(sys.argv[3]).parent))  # the repository (this script: benchmarks/)
from emo_trainer.benchmarks.gpu_verify import CALL_CARRY
limit = 64 * 2**20
def du(p):
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0
bad = False
for call, parts in CALL_CARRY.items():
    total = tree + sum(du(stage / p) for p in parts)
    flag = "OK" if total < limit - 2**20 else "TOO BIG"
    bad |= flag != "OK"
    print(f"call {call}: {total / 2**20:6.1f} MiB of 64 (working tree {tree / 2**20:.1f} + "
          + " + ".join(f"{p} {du(stage / p) / 2**20:.1f}" for p in parts) + f")  {flag}")
    print("  carry: " + json.dumps([f"{stage}/{p}" for p in parts]))
sys.exit(1 if bad else 0)
EOF
}

if [[ "${1:-}" == "--sizes" ]]; then sizes; exit; fi

mkdir -p "$stage"
# ---- wheels
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git -C "$scratch" init -q
(cd "$scratch" && bash "$tool" --deepspeed --cce --trl "$LIGER" >/dev/null)
rm -rf "$stage"/wheels-*
mkdir -p "$stage"/wheels-{base,mauve,ds,bench}
for w in "$scratch"/.whl/*.whl; do
  case $(basename "$w") in
    datasets-*|dill-*|multiprocess-*) g=base ;;
    evaluate-*|mauve_text-*|faiss_cpu-*) g=mauve ;;
    deepspeed-*|hjson-*|pydantic-*|pydantic_core-*|annotated_types-*|typing_inspection-*) g=ds ;;
    cut_cross_entropy-*|trl-*|liger_kernel-*) g=bench ;;
    *) echo "unexpected wheel $(basename "$w"): put it in a group" >&2; exit 1 ;;
  esac
  cp "$w" "$stage/wheels-$g/"
done
# ---- tokenizer, data, model
m=$shared/models/gpt2-gutenberg-30m
rm -rf "$stage"/{tokenizer,wikitext,model} && mkdir -p "$stage"/{tokenizer,wikitext,model}
cp "$m"/tokenizer.json "$m"/tokenizer_config.json "$stage/tokenizer/"
for f in wikitext-2/wiki.train.tokens wikitext-2-raw/wiki.valid.raw wikitext-2-raw/wiki.test.raw; do
  xz -6 -T1 -c "$shared/data/$f" > "$stage/wikitext/$(basename "$f").xz"
done
cp "$m"/config.json "$m"/generation_config.json "$m"/tokenizer.json "$m"/tokenizer_config.json "$stage/model/"
xz -6 -T1 -c "$m"/model.safetensors > "$stage/model/model.safetensors.xz"
chmod -R u+w "$stage"
sizes
