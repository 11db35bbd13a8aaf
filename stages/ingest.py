"""Stage `ingest`: MIMIC-CXR (DICOM or JPG) -> clean, cached training set.

Reads params.yaml (base.num_workers, paths.raw, paths.raw_jpg, paths.interim, ingest.*) and the dataset under
paths.raw / paths.raw_jpg. Writes paths.interim/{manifest.parquet, rejected.parquet, images_<split>.npy,
sample_grid.png, release.json} and metrics/ingest.json.

Under DVC the stage depends on the release's fingerprint files (record/study lists, metadata, split and label tables,
reports zip, each root's SHA256SUMS.txt), not on the image trees: see cxrsynth.data.ingest.release_fingerprint.

Scale-out (cxrsynth.shards): `--shard I/N --out DIR` decodes only shard I of N into the shard folder DIR;
`--merge DIR...` merges the folders of shards 0..N-1 into the outputs above (or `--out`, `--metrics`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from cxrsynth.config import stage_params
from cxrsynth.data.ingest import IngestError, ingest, ingest_shard, merge_ingest
from cxrsynth.io import write_json
from cxrsynth.shards import ShardError, stage_arguments


def main(argv: list[str] | None = None) -> None:
    params = stage_params()
    try:
        args, shard = stage_arguments("python -m stages.ingest", __doc__.split("\n")[0], "paths.interim",
                                      "<paths.metrics>/ingest.json", argv)
        out = args.out or params.paths.interim
        if shard is not None:
            index, count = shard
            info = ingest_shard(params.ingest, params.paths.raw, params.paths.raw_jpg, out,
                                workers=params.base.num_workers, index=index, count=count)
            print(f"ingest shard {index}/{count}: candidates [{info['start']}, {info['stop']}) of {info['n']} -> {out}")
            return
        if args.merge:
            metrics = merge_ingest(params.ingest, args.merge, out)
        else:
            metrics = ingest(params.ingest, params.paths.raw, params.paths.raw_jpg, out,
                             workers=params.base.num_workers)
    except (IngestError, ShardError) as e:
        print(f"ingest error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    write_json(args.metrics or Path(params.paths.metrics) / "ingest.json", metrics)
    print(f"ingest: read {metrics['read']} = accepted {metrics['accepted']} + rejected {metrics['rejected']} "
          f"({metrics['rejected_by_reason']}); {metrics['images_per_second']} images/s; release "
          f"{metrics['release_sha256']}")


if __name__ == "__main__":
    main()
