"""Stage `prompts`: the anatomy-pathology prompting module.

Reads params.yaml (base.seed, paths.interim, paths.phantom, paths.prompts, prompts.*), the ingest manifest and, when
present, the phantom's ground-truth sidecar. Writes paths.prompts/{vocab.json, findings.parquet, prompts.parquet}
and metrics/prompts.json.
"""
from __future__ import annotations

from pathlib import Path

from cxrsynth.config import stage_params
from cxrsynth.io import write_json
from cxrsynth.prompts import run


def main() -> None:
    params = stage_params()
    sidecar = Path(params.paths.phantom) / "ground_truth.jsonl"
    metrics = run(params.prompts, params.base.seed, Path(params.paths.interim) / "manifest.parquet",
                  Path(params.paths.prompts), sidecar if sidecar.is_file() else None)
    write_json(Path(params.paths.metrics) / "prompts.json", metrics)
    keys = ("prompts/round_trip_exact", "labels/macro_agreement", "extraction/present/macro_f1",
            "extraction/absent/macro_f1", "extraction/uncertain/macro_f1")
    print("prompts: " + ", ".join(f"{k}={metrics.get(k)}" for k in keys))


if __name__ == "__main__":
    main()
