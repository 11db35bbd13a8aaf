"""Stage `fixture`: write the embedded MIMIC-CXR-shaped phantom dataset.

Reads params.yaml (base.seed, base.num_workers, paths.*, fixture.*). Writes paths.phantom_raw (MIMIC-CXR layout),
paths.phantom_raw_jpg (MIMIC-CXR-JPG layout, when fixture.write_jpg), paths.phantom (ground_truth.jsonl, contact_sheet.png)
and metrics/fixture.json.
"""
from __future__ import annotations

import time
from pathlib import Path

from cxrsynth.stages import check_outputs
from cxrsynth.config import stage_params
from cxrsynth.data.phantom.dataset import generate
from cxrsynth.io import write_json


def main() -> None:
    params = stage_params()
    check_outputs(params, "fixture")
    t0 = time.perf_counter()
    metrics = generate(params.fixture, params.base.seed, params.paths.phantom_raw, params.paths.phantom_raw_jpg,
                       params.paths.phantom, workers=params.base.num_workers)
    write_json(Path(params.paths.metrics) / "fixture.json", metrics)
    print(f"fixture: {metrics['patients']} patients, {metrics['studies']} studies, {metrics['images']} images "
          f"in {time.perf_counter() - t0:.1f} s -> {params.paths.phantom_raw}")

