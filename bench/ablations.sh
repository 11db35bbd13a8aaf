#!/usr/bin/env bash
# The paper's two claims, tested: run the three ablation arms under SEEDS seeds (base.seed 0..SEEDS-1) as DVC
# experiments, one after the other in the workspace, keep each run's metrics/evaluate.json, and write
# bench/ablations.md from the runs' per-item tables (python -m bench.ablations: mean and spread over seeds, and per
# seed the paired differences to arm (c) with bootstrap intervals, as `python -m cxrsynth compare` computes them).
#
#   bench/ablations.sh              # arms a b c, 3 seeds (seeds k-1 .. 0, c last at each: the workspace ends on the
#                                   # defaults)
#   bench/ablations.sh 5            # 5 seeds
#   ARMS="a c" bench/ablations.sh 2 # a subset
# Each seed retrains everything (base.seed reaches the phantom's prompts and every model): about one `make repro`
# per arm and seed on 2 cores.
#
# (a) no key patches:            -S generator.key_patches=0
# (b) original test reports:     -S synthesize.prompt_source=reports
# (c) both modules on:           the defaults of params.yaml
# Every arm sets both switches explicitly, so an arm never inherits the previous arm's values. params.yaml is
# restored at the end. `dvc exp show` lists the experiments (named abl-<arm>-<time>) side by side afterwards.
set -euo pipefail
SEEDS=${1:-3}
case $SEEDS in ''|*[!0-9]*|0) echo "seed count must be a positive integer, got '$SEEDS'" >&2; exit 1 ;; esac
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONHASHSEED=0
if ! git config user.name >/dev/null || ! git config user.email >/dev/null; then
  echo "dvc exp needs git user.name and user.email (git config ...)" >&2; exit 1
fi
read -r K SRC < <(python -c "import yaml; p = yaml.safe_load(open('params.yaml')); \
print(p['generator']['key_patches'], p['synthesize']['prompt_source'])")
if [ "$K" = "0" ] || [ "$SRC" != "prompts" ]; then
  echo "params.yaml must hold the default arm (c): generator.key_patches > 0, synthesize.prompt_source: prompts" >&2
  exit 1
fi
OUT=bench/ablations
mkdir -p "$OUT"
BAK=$(mktemp)
cp params.yaml "$BAK"
trap 'cp "$BAK" params.yaml; rm -f "$BAK"' EXIT
SEED0=$(python -c "import yaml; print(yaml.safe_load(open('params.yaml'))['base']['seed'])")
stamp=$(date +%Y%m%d-%H%M%S)
declare -A RUNS
for ((s = SEEDS - 1; s >= 0; s--)); do  # seed 0 last: the workspace ends on params.yaml's own run
  for arm in ${ARMS:-a b c}; do
    case $arm in
      a) set_k=0;  set_src=prompts ;;
      b) set_k=$K; set_src=reports ;;
      c) set_k=$K; set_src=prompts ;;
      *) echo "unknown arm $arm (a, b or c)" >&2; exit 1 ;;
    esac
    name="abl-$arm-s$s-$stamp"
    echo "== arm $arm seed $s: generator.key_patches=$set_k synthesize.prompt_source=$set_src"
    start=$(date +%s)
    dvc exp run -n "$name" -S "base.seed=$s" -S "generator.key_patches=$set_k" -S "synthesize.prompt_source=$set_src"
    cp metrics/evaluate.json "$OUT/$arm-s$s.json"
    RUNS[$arm]="$name${RUNS[$arm]:+,${RUNS[$arm]}}"  # seed order 0..k-1
    echo "== arm $arm seed $s took $(( $(date +%s) - start )) s"
  done
done
args=()
for arm in a b c; do [ -n "${RUNS[$arm]:-}" ] && args+=(--arm "$arm=${RUNS[$arm]}"); done
{
  echo "# Ablations (bench/ablations.sh $SEEDS, $(date -u +%Y-%m-%d); params.yaml base.seed was $SEED0)"
  echo
  python -m bench.ablations "${args[@]}"
} > bench/ablations.md
echo "wrote bench/ablations.md"
