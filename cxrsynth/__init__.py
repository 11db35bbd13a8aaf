"""cxrsynth: reproducible text-to-chest-X-ray synthesis (anatomy-pathology prompting + fine-grained alignment)."""
import os

# Nothing in the project may reach a model hub at run time; set before transformers is ever imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Bit-identical CPU results on any x86-64 machine: torch (ATen), oneDNN and MKL each pick their kernels by the
# CPU's instruction set, and AVX-512 / AMX kernels sum in another order than AVX2 ones, so the same params and seed
# trained different weights on two machines (measured: every model folder and the evaluation differed after
# classifier). Pinning all three to AVX2 makes the kernels the same wherever AVX2 exists (every x86-64 CPU since
# 2013-2015), at ~1.3x the CPU time of AVX-512 (bench/generator.py: 7.9k vs 10.3k image tokens/s on one thread).
# numpy dispatches its ufunc loops (exp, log, sin, ...) by instruction set as well: the AVX-512 levels of the pinned
# numpy 2.4 are disabled, so the phantom's renderer computes the same pixels everywhere (measured 2026-12-08: the
# committed lock's phantom, made on an AVX-512 Intel machine, differed from the one an AVX2-only AMD EPYC wrote, text
# identical, pixels not; that this pin removes the difference is the expected cause, not yet checked on an
# AVX-512 machine). The names are numpy 2.4's (`numpy._core._multiarray_umath.__cpu_dispatch__`).
# Set before torch and numpy are imported; a variable the user sets wins, and CXRSYNTH_CPU_ISA=native leaves them
# all unset. GPU kernels are not affected.
CPU_ISA_PIN = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2",
               "MKL_CBWR": "AVX2", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx2" in line.split()
    except OSError:
        pass
    return False


def pin_cpu_isa(environ=os.environ) -> bool:
    """Set the CPU_ISA_PIN variables (where unset) unless CXRSYNTH_CPU_ISA is `native` or the CPU has no AVX2;
    returns whether the pin applies. Must run before torch and numpy are imported to take effect."""
    choice = environ.get("CXRSYNTH_CPU_ISA", "avx2")
    if choice not in ("avx2", "native"):
        raise SystemExit(f"CXRSYNTH_CPU_ISA: expected avx2 or native, got {choice!r}")
    if choice == "native" or not _has_avx2():
        return False
    for key, value in CPU_ISA_PIN.items():
        environ.setdefault(key, value)
    return True


pin_cpu_isa()

__version__ = "0.1.0"
