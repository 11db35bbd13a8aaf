"""Sweep classifier settings over seeds on the ingested phantom (GPU or CPU); one JSON line per run.

    python -m bench.classifier_sweep --device cuda --seeds 0 1 --grid '[{"width": 16}, {"width": 24}]'

Reads params.yaml and `<interim>/manifest.parquet` + `images_<split>.npy` directly (no DICOM stack needed, so it runs
on a bare GPU machine). Writes one JSON line per run to stdout and, with --out, to that file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrsynth.config import ClassifierParams, build_section, load_params
from cxrsynth.models.classifier import fit, split_report
from cxrsynth.data.arrays import LabeledImages
from cxrsynth.text.chexpert import OBSERVATIONS


def load(interim: Path, split: str) -> LabeledImages:
    m = pd.read_parquet(interim / "manifest.parquet")
    rows = m[m.split == split].sort_values("image_row")
    return LabeledImages(np.load(interim / f"images_{split}.npy"), rows[list(OBSERVATIONS)].to_numpy(float))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--grid", default="[{}]", help="JSON list of classifier overrides")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    params = load_params()
    interim = Path(params.paths.interim)
    data = {s: load(interim, s) for s in ("train", "validate", "test")}
    for over in json.loads(a.grid):
        p = build_section(ClassifierParams, "classifier", {**dataclasses.asdict(params.classifier), **over})
        for seed in a.seeds:
            t0 = time.perf_counter()
            model, res = fit(p, data["train"], data["validate"], seed=seed, device=a.device, progress=False)
            secs = time.perf_counter() - t0
            rep, _, _ = split_report(model, data["test"], blank=p.blank_policy, min_count=p.min_count, n_boot=0)
            line = json.dumps({"overrides": over, "seed": seed, "device": str(model.device),
                               "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                               "seconds": round(secs, 1), "best_step": res.best_step, "steps": res.step,
                               "val_macro": round(res.best_metric, 4), "test_macro": rep["macro_auroc"],
                               "test": {k[6:]: v for k, v in rep.items() if k.startswith("auroc/") and v}})
            print(line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
