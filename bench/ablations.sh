#!/usr/bin/env bash
# The paper's two claims, tested: run the three ablation arms as DVC experiments, one after the other in the
# workspace, keep each arm's metrics/evaluate.json, and write bench/ablations.md (python -m bench.ablations).
#
#   bench/ablations.sh              # arms a b c (c last: the workspace ends on the default params)
#   ARMS="c" bench/ablations.sh     # a subset (the table shows the arms that have a metrics copy)
#
# (a) no key patches:            -S generator.key_patches=0
# (b) original test reports:     -S synthesize.prompt_source=reports
# (c) both modules on:           the defaults of params.yaml
# Every arm sets both switches explicitly, so an arm never inherits the previous arm's values. params.yaml is
# restored at the end. `dvc exp show` lists the experiments (named abl-<arm>-<time>) side by side afterwards.
set -euo pipefail
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
stamp=$(date +%Y%m%d-%H%M%S)
for arm in ${ARMS:-a b c}; do
  case $arm in
    a) set_k=0;  set_src=prompts ;;
    b) set_k=$K; set_src=reports ;;
    c) set_k=$K; set_src=prompts ;;
    *) echo "unknown arm $arm (a, b or c)" >&2; exit 1 ;;
  esac
  echo "== arm $arm: generator.key_patches=$set_k synthesize.prompt_source=$set_src"
  start=$(date +%s)
  dvc exp run -n "abl-$arm-$stamp" -S "generator.key_patches=$set_k" -S "synthesize.prompt_source=$set_src"
  cp metrics/evaluate.json "$OUT/$arm.json"
  echo "== arm $arm took $(( $(date +%s) - start )) s"
done
files=()
for arm in a b c; do [ -f "$OUT/$arm.json" ] && files+=("$OUT/$arm.json"); done
{
  echo "# Ablations (bench/ablations.sh, $(date -u +%Y-%m-%d))"
  echo
  python -m bench.ablations "${files[@]}"
} > bench/ablations.md
echo "wrote bench/ablations.md"
