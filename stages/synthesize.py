"""Stage `synthesize`: prompts -> key patches -> image tokens -> synthetic chest X-rays, with lineage.

Reads: params.yaml (base, paths, synthesize), `<models>/generator/` (with its copy of the key-patch bank),
`<models>/vqgan/`, and per `synthesize.prompt_source`: `<prompts>/prompts.parquet` (`prompts`: sampled and paired
prompts) or `<interim>/manifest.parquet` (`reports`: one prompt per test study from its own report).
Writes `<synthetic>/`: `images/<synthetic_id>.png`, `images.npy` (uint8 N x S x S, manifest order),
`manifest.parquet` (one row per image: prompt, terms, labels, key patches, seed, sampling params, model hashes),
`contact_sheet.png` (prompts beside their images), optional `dicom/`; and `<metrics>/synthesize.json` (count, images
per second, time, share of prompts with key patches, code usage and per-position entropy).

Scale-out (cxrsynth.shards): `--shard I/N --out DIR` makes only shard I of N of the (prompt, sample) list, into the
shard folder DIR; `--merge DIR...` merges the folders of shards 0..N-1 into the outputs above (or `--out`,
`--metrics`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from cxrsynth.config import stage_params
from cxrsynth.io import write_json
from cxrsynth.shards import ShardError, stage_arguments
from cxrsynth.synthesis import merge_synthesis, run_stage


def main(argv: list[str] | None = None) -> None:
    params = stage_params()
    try:
        args, shard = stage_arguments("python -m stages.synthesize", __doc__.split("\n")[0], "paths.synthetic",
                                      "<paths.metrics>/synthesize.json", argv)
        out = args.out or params.paths.synthetic
        if shard is not None:
            info = run_stage(params, out, shard=shard)
            print(f"synthesize shard {shard[0]}/{shard[1]}: images [{info['start']}, {info['stop']}) of "
                  f"{info['n']} -> {out}")
            return
        metrics = merge_synthesis(params, args.merge, out) if args.merge else run_stage(params, out)
    except ShardError as e:
        print(f"synthesize error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    write_json(args.metrics or Path(params.paths.metrics) / "synthesize.json", metrics)
    print(f"synthesize: {metrics['count']} images from {metrics['prompts']} prompts ({metrics['prompt_source']}) in "
          f"{metrics['seconds']} s ({metrics['images_per_second']} images/s sampling), "
          f"{100 * metrics['prompts_with_key_patches']:.0f}% of prompts with key patches, "
          f"{metrics['codes_used']} codes used ({100 * metrics['code_usage']:.0f}% of the codebook) -> {out}")


if __name__ == "__main__":
    main()
