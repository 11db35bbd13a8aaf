"""Benchmark the phantom painter: seconds per image at a phantom image size, with and without findings.

    python -m bench.render [repeats]      # default 5 timed renders per case, after one warm-up render

The timing used to be a test (`min < 0.25 s`), which a loaded CI machine could fail; here it is a number against a
baseline measured in the same run: the same anatomy and pose painted with no finding. Prints a table (target ~0.06 s
per 400 x 340 image on one core) and one JSON line with the same numbers. Writes nothing.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

from cxrsynth.data.phantom.render import render_image
from cxrsynth.data.phantom.truth import Anatomy, Finding, Pose

TARGET_S = 0.06
CASES = {
    "no finding (baseline)": [],
    "small left effusion": [Finding("effusion", "left", "small")],
    "cardiomegaly + edema": [Finding("cardiomegaly", None, "moderate"), Finding("edema", "bilateral", "mild")],
    "pneumothorax + ET tube": [Finding("pneumothorax", "right", "moderate"), Finding("et_tube")],
}


def timed(fn, repeats: int) -> float:
    fn()  # warm caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str]) -> int:
    repeats = int(argv[0]) if argv else 5
    if repeats < 1:
        raise SystemExit("repeats: expected an int >= 1")
    rng = np.random.default_rng(6)
    anatomy = Anatomy(sex="F", age=60, thorax_width=0.7, lung_height=0.57, ctr=0.45, mediastinum_width=0.26,
                      soft_tissue=0.5)
    pose = Pose(rotation=1.0, shift_x=0.0, shift_y=0.0, inspiration=10.0, exposure=1.0, noise=0.01,
                seed=int(rng.integers(0, 2**31 - 1)))
    rows = {}
    for name, findings in CASES.items():
        ctr = 0.56 if any(f.kind == "cardiomegaly" for f in findings) else 0.45
        rows[name] = timed(lambda fs=findings, c=ctr: render_image(anatomy, fs, c, "PA", pose, 400, 340), repeats)
    base = rows["no finding (baseline)"]
    print(f"{'case':<28} {'s/image':>8} {'x baseline':>10} {'x target':>9}")
    for name, s in rows.items():
        print(f"{name:<28} {s:8.3f} {s / base:10.2f} {s / TARGET_S:9.2f}")
    print(json.dumps({"seconds_per_image": rows, "target_s": TARGET_S, "repeats": repeats}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
