"""The CPU kernels' instruction set is pinned (cxrsynth/__init__.py): the same seed trains the same bits on any
x86-64 CPU with AVX2, not different ones on an AVX-512 / AMX machine."""
import os
import subprocess
import sys

import pytest

import cxrsynth

PROBE = """
import cxrsynth, hashlib, os, torch
torch.manual_seed(0); torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.GELU(), torch.nn.Flatten(),
                          torch.nn.Linear(8 * 16 * 16, 4))
opt = torch.optim.AdamW(net.parameters(), 1e-3)
x, y = torch.rand(8, 1, 16, 16), torch.randint(0, 4, (8,))
for _ in range(5):
    loss = torch.nn.functional.cross_entropy(net(x), y); opt.zero_grad(); loss.backward(); opt.step()
print(torch.backends.cpu.get_cpu_capability(), os.environ.get("MKL_CBWR", "-"),
      hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in net.parameters())).hexdigest())
"""


def probe(**env) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in (*cxrsynth.CPU_ISA_PIN, "CXRSYNTH_CPU_ISA")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_pin_sets_only_unset_variables_and_native_opts_out():
    env = {"MKL_CBWR": "COMPATIBLE"}
    applies = cxrsynth.pin_cpu_isa(env)
    assert env["MKL_CBWR"] == "COMPATIBLE"              # the user's own setting wins
    if applies:
        assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    native = {"CXRSYNTH_CPU_ISA": "native"}
    assert cxrsynth.pin_cpu_isa(native) is False and set(native) == {"CXRSYNTH_CPU_ISA"}
    with pytest.raises(SystemExit, match="CXRSYNTH_CPU_ISA"):
        cxrsynth.pin_cpu_isa({"CXRSYNTH_CPU_ISA": "avx512"})


@pytest.mark.skipif(not cxrsynth._has_avx2(), reason="needs an x86-64 CPU with AVX2")
def test_importing_cxrsynth_first_runs_the_avx2_kernels():
    cap, cbwr, pinned = probe()
    assert (cap, cbwr) == ("AVX2", "AVX2")
    # the pin is the same computation as setting the libraries' own variables by hand
    assert probe(CXRSYNTH_CPU_ISA="native", **cxrsynth.CPU_ISA_PIN)[2] == pinned
    # and it is deterministic
    assert probe()[2] == pinned


NUMPY_PROBE = """
import cxrsynth, os
from numpy._core import _multiarray_umath as m
print(os.environ.get("NPY_DISABLE_CPU_FEATURES", "-").replace(" ", ","),
      ",".join(f for f in m.__cpu_dispatch__ if m.__cpu_features__.get(f)) or "-")
"""


def test_numpy_dispatch_stops_below_avx512_unless_native():
    """numpy's ufunc loops are pinned with the rest: no AVX-512 level is active after `import cxrsynth` (on an
    AVX2-only CPU none is found anyway; the variable is what makes an AVX-512 machine compute the same bits)."""
    if not cxrsynth._has_avx2():
        pytest.skip("the pin applies only where AVX2 exists")

    def run(**env):
        clean = {k: v for k, v in os.environ.items() if k not in (*cxrsynth.CPU_ISA_PIN, "CXRSYNTH_CPU_ISA")}
        out = subprocess.run([sys.executable, "-W", "error", "-c", NUMPY_PROBE], env={**clean, **env},
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    disabled, active = run()
    from numpy._core import _multiarray_umath as m
    assert set(disabled.split(",")) <= set(m.__cpu_dispatch__)  # names this numpy knows (an unknown one warns)
    assert not set(active.split(",")) & {"X86_V4", "AVX512_ICL", "AVX512_SPR"}
    assert run(CXRSYNTH_CPU_ISA="native")[0] == "-"
