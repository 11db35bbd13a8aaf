"""Benchmark the classifier on the ingested phantom: training time, validation and test macro AUROC.

    python -m bench.classifier                                  # params.yaml as is
    python -m bench.classifier epochs=30 width=24 input_size=96  # overrides of the classifier section

Reads params.yaml and data/interim (run the pipeline up to `ingest` first). Writes nothing; prints one JSON line.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import torch
import yaml

from cxrsynth.config import ClassifierParams, build_section, stage_params
from cxrsynth.models.classifier import fit, split_report
from cxrsynth.stages.classifier import load_labeled


def main(argv: list[str]) -> None:
    params = stage_params()
    over = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in argv)}
    cp = build_section(ClassifierParams, "classifier", {**dataclasses.asdict(params.classifier), **over})
    data = {s: load_labeled(params.paths.interim, s) for s in ("train", "validate", "test")}
    t0 = time.perf_counter()
    model, res = fit(cp, data["train"], data["validate"], seed=params.base.seed, device="cpu", progress=False)
    secs = time.perf_counter() - t0
    report, _, _ = split_report(model, data["test"], blank=cp.blank_policy, min_count=cp.min_count, n_boot=0)
    aurocs = {k.split("/", 1)[1]: v for k, v in report.items() if k.startswith("auroc/") and v is not None}
    print(json.dumps({"overrides": over, "threads": torch.get_num_threads(), "train_seconds": round(secs, 1),
                      "steps": res.step, "best_step": res.best_step, "val_macro": round(res.best_metric, 4),
                      "test_macro": report["macro_auroc"], "test_labels": report["macro_auroc_labels"],
                      "test_auroc": aurocs}))


if __name__ == "__main__":
    main(sys.argv[1:])
