"""Stage `ingest`: MIMIC-CXR (DICOM or JPG) -> clean, cached training set.

Reads params.yaml (base.num_workers, paths.raw, paths.raw_jpg, paths.interim, ingest.*) and the dataset under
paths.raw / paths.raw_jpg. Writes paths.interim/{manifest.parquet, rejected.parquet, images_<split>.npy,
sample_grid.png} and metrics/ingest.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

from cxrsynth.config import stage_params
from cxrsynth.data.ingest import IngestError, ingest
from cxrsynth.io import write_json


def main() -> None:
    params = stage_params()
    try:
        metrics = ingest(params.ingest, params.paths.raw, params.paths.raw_jpg, params.paths.interim,
                         workers=params.base.num_workers)
    except IngestError as e:
        print(f"ingest error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    write_json(Path(params.paths.metrics) / "ingest.json", metrics)
    print(f"ingest: read {metrics['read']} = accepted {metrics['accepted']} + rejected {metrics['rejected']} "
          f"({metrics['rejected_by_reason']}); {metrics['images_per_second']} images/s")


if __name__ == "__main__":
    main()
