#!/usr/bin/env bash
# Issue 21's levers, measured: each lever is one DVC experiment (base.seed 0 unless it says otherwise) run in the
# workspace after the other, its metrics/evaluate.json kept under bench/conditioning/, and bench/conditioning.md
# written by `python -m bench.conditioning` from the experiments' per-item tables: every headline with its
# bootstrap 95% interval and each lever's paired difference to the baseline (the same prompts: paired).
#
#   bench/conditioning.sh                    # every lever of LEVERS below
#   LEVERS="base guidance2" bench/conditioning.sh
#   SEED=1 LEVERS="base guidance2 guidance3 codes_mix" bench/conditioning.sh   # another base.seed (retrains all;
#                                            # writes bench/conditioning-s1.md and bench/conditioning/<lever>-s1.*)
#
# Every lever sets every swept key explicitly, so no lever inherits another's value; params.yaml is restored at
# the end. `dvc exp show` lists the runs (cond-<lever>-<time>) afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONHASHSEED=0
if ! git config user.name >/dev/null || ! git config user.email >/dev/null; then
  echo "dvc exp needs git user.name and user.email (git config ...)" >&2; exit 1
fi
# the defaults the levers move away from (read from params.yaml, so the baseline is what make repro runs)
read -r CODES STEPS GUIDE TEXT < <(python -c "import yaml; p = yaml.safe_load(open('params.yaml')); \
g, s = p['generator'], p['synthesize']; print(g['key_patch_codes'], g['steps'], s['guidance_scale'], g['max_text_tokens'])")
declare -A SETS=(
  [base]=""
  [codes_image]="generator.key_patch_codes=image"
  [codes_mix]="generator.key_patch_codes=mix"
  [steps_x3]="generator.steps=$((STEPS * 3))"
  [guidance1.5]="synthesize.guidance_scale=1.5"
  [guidance2]="synthesize.guidance_scale=2.0"
  [guidance3]="synthesize.guidance_scale=3.0"
  [text128]="generator.max_text_tokens=128"
)
ORDER="base codes_image guidance2 steps_x3 codes_mix guidance1.5 guidance3 text128"
OUT=bench/conditioning
SUFFIX=${SEED:+-s$SEED}
case ${SEED:-0} in *[!0-9]*) echo "SEED must be a non-negative integer, got '$SEED'" >&2; exit 1 ;; esac
mkdir -p "$OUT"
BAK=$(mktemp)
cp params.yaml "$BAK"
trap 'cp "$BAK" params.yaml; rm -f "$BAK"' EXIT
stamp=$(date +%Y%m%d-%H%M%S)
runs=()
for lever in ${LEVERS:-$ORDER}; do
  [ -n "${SETS[$lever]+x}" ] || { echo "unknown lever $lever (one of: $ORDER)" >&2; exit 1; }
  flags=(${SEED:+-S "base.seed=$SEED"} -S "generator.key_patch_codes=$CODES" -S "generator.steps=$STEPS" -S "synthesize.guidance_scale=$GUIDE" -S "generator.max_text_tokens=$TEXT")
  for kv in ${SETS[$lever]}; do flags+=(-S "$kv"); done
  name="cond-$lever$SUFFIX-$stamp"
  echo "== $lever: ${flags[*]}"
  start=$(date +%s)
  dvc exp run -n "$name" "${flags[@]}"
  secs=$(( $(date +%s) - start ))
  cp metrics/evaluate.json "$OUT/$lever$SUFFIX.json"
  cp metrics/generator.json "$OUT/$lever$SUFFIX.generator.json"
  echo "{\"lever\": \"$lever\", \"seconds\": $secs, \"set\": \"${SETS[$lever]}\"}" > "$OUT/$lever$SUFFIX.run.json"
  runs+=("$lever$SUFFIX=$name")
  echo "== $lever took $secs s"
done
{
  echo "# Conditioning levers (bench/conditioning.sh, $(date -u +%Y-%m-%d), base.seed ${SEED:-as params.yaml})"
  echo
  python -m bench.conditioning "${runs[@]}"
} > "bench/conditioning$SUFFIX.md"
echo "wrote bench/conditioning$SUFFIX.md"
