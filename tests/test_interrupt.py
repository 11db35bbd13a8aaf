"""Hardening: a training run killed with SIGTERM or SIGKILL resumes from its checkpoint on the next run and ends with
exactly the weights of an uninterrupted run (single process, CPU)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

WORKER = Path(__file__).with_name("train_worker.py")
ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
       "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def cmd(out, ckpt, sleep=0.0):
    return [sys.executable, str(WORKER), str(out), "--ckpt", str(ckpt), "--sleep", str(sleep), "--steps", "40",
            "--dropout", "0.1"]


def checkpoint_step(ckpt: Path) -> int:
    state = ckpt / "last" / "state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_and_matches(tmp_path, sig):
    ref = tmp_path / "ref.safetensors"
    subprocess.run(cmd(ref, tmp_path / "ref_ckpt"), env=ENV, check=True, capture_output=True, timeout=120)

    ckpt, out = tmp_path / "ckpt", tmp_path / "out.safetensors"
    proc = subprocess.Popen(cmd(out, ckpt, sleep=0.05), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while checkpoint_step(ckpt) < 10 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL), err[-2000:]
    assert not out.exists()
    stopped = checkpoint_step(ckpt)
    assert 10 <= stopped < 40
    if sig == signal.SIGTERM:
        assert "SIGTERM at step" in err

    res = subprocess.run(cmd(out, ckpt), env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed_from={stopped}" in res.stdout
    a, b = safetensors.torch.load_file(str(ref)), safetensors.torch.load_file(str(out))
    assert all(torch.equal(a[k], b[k]) for k in a)
