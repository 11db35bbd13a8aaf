"""Benchmark: ingest throughput vs a plain pydicom decode + resize loop over the same files (same run).

    python bench/ingest.py [--size bench] [--workdir /tmp/cxrsynth-bench] [--image-size 128]

Generates (once) the phantom at the given fixture size, then times, on the frontal images:
  baseline  : for each file, pydicom.dcmread(path).pixel_array, min-max to [0,1], resize (no checks, no VOI)
  ingest x1 : the ingest stage's collect + decode + write with 1 worker
  ingest xN : the same with N = os.cpu_count() workers
and prints images/second and the ratios (targets: x1 within 1.3x of the baseline's time; xN >= 0.8 N times x1).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrsynth.config import FixtureParams, IngestParams  # noqa: E402
from cxrsynth.stages.ingest import collect, ingest
from cxrsynth.images import to_square
from cxrsynth.data.phantom.dataset import generate  # noqa: E402


def baseline(paths: list[Path], size: int) -> int:
    n = 0
    for p in paths:
        try:
            a = pydicom.dcmread(p).pixel_array.astype(np.float32)
        except Exception:  # the plain loop just skips what it cannot read
            continue
        a = (a - a.min()) / max(1.0, float(a.max() - a.min()))
        to_square(a, size, "pad")
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="bench", help="fixture size name (tiny | default | bench)")
    ap.add_argument("--workdir", default="/tmp/cxrsynth-bench")
    ap.add_argument("--image-size", type=int, default=128)
    args = ap.parse_args()
    work = Path(args.workdir) / args.size
    fix = FixtureParams(cohort=args.size)
    if not (work / "phantom" / "ground_truth.jsonl").exists():
        t = time.perf_counter()
        generate(fix, 0, work / "mimic-cxr", work / "mimic-cxr-jpg", work / "phantom", workers=os.cpu_count() or 1)
        print(f"generated {args.size} phantom in {time.perf_counter() - t:.1f} s")
    params = IngestParams(image_size=args.image_size)
    cand = collect(params, work / "mimic-cxr", work / "mimic-cxr-jpg")
    paths = [work / "mimic-cxr" / p for p in cand.table.path]
    ncpu = os.cpu_count() or 1

    t = time.perf_counter()
    n_base = baseline(paths, args.image_size)
    t_base = time.perf_counter() - t
    t = time.perf_counter()
    m1 = ingest(params, work / "mimic-cxr", work / "mimic-cxr-jpg", work / "out1", workers=1)
    t_1 = time.perf_counter() - t
    t = time.perf_counter()
    mn = ingest(params, work / "mimic-cxr", work / "mimic-cxr-jpg", work / "outN", workers=ncpu)
    t_n = time.perf_counter() - t
    same = pd.read_parquet(work / "out1" / "manifest.parquet").equals(pd.read_parquet(work / "outN" / "manifest.parquet"))

    rows = [("baseline (pydicom loop)", n_base, t_base), ("ingest, 1 worker", m1["accepted"], t_1),
            (f"ingest, {ncpu} workers", mn["accepted"], t_n)]
    print(f"\n{len(paths)} frontal images listed, image_size {args.image_size}")
    print(f"{'run':28s} {'images':>7s} {'seconds':>8s} {'img/s':>8s}")
    for name, n, s in rows:
        print(f"{name:28s} {n:7d} {s:8.2f} {n / s:8.1f}")
    print(f"\ningest x1 time / baseline time = {t_1 / t_base:.2f}   (target <= 1.30)")
    print(f"ingest x{ncpu} speed-up over x1 = {t_1 / t_n:.2f}   (target >= {0.8 * ncpu:.2f})")
    print(f"1-worker and {ncpu}-worker outputs identical: {same}")


if __name__ == "__main__":
    main()
