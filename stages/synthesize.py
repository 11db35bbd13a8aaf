"""Stage `synthesize`: prompts -> key patches -> image tokens -> synthetic chest X-rays, with lineage.

Reads: params.yaml (base, paths, synthesize), `<models>/generator/` (with its copy of the key-patch bank),
`<models>/vqgan/`, and per `synthesize.prompt_source`: `<prompts>/prompts.parquet` (`prompts`: sampled and paired
prompts) or `<interim>/manifest.parquet` (`reports`: one prompt per test study from its own report).
Writes `<synthetic>/`: `images/<synthetic_id>.png`, `images.npy` (uint8 N x S x S, manifest order),
`manifest.parquet` (one row per image: prompt, terms, labels, key patches, seed, sampling params, model hashes),
`contact_sheet.png` (prompts beside their images), optional `dicom/`; and `<metrics>/synthesize.json` (count, images
per second, time, share of prompts with key patches, code usage).

Scale-out (cxrsynth.shards): `--shard I/N --out DIR` makes only shard I of N of the (prompt, sample) list, into the
shard folder DIR; `--merge DIR...` merges the folders of shards 0..N-1 into the outputs above (or `--out`,
`--metrics`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxrsynth.config import stage_params
from cxrsynth.io import write_json
from cxrsynth.shards import ShardError, parse_shard
from cxrsynth.synthesis import merge_synthesis, run_stage


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.synthesize", description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--shard", metavar="I/N", help="make only shard I of N (needs --out)")
    mode.add_argument("--merge", nargs="+", metavar="DIR", help="merge the folders of shards 0..N-1")
    ap.add_argument("--out", help="output folder (default paths.synthetic; the shard folder with --shard)")
    ap.add_argument("--metrics", help="metrics file (default <paths.metrics>/synthesize.json)")
    args = ap.parse_args(argv)
    params = stage_params()
    out = args.out or params.paths.synthetic
    try:
        if args.shard is not None:
            shard = parse_shard(args.shard)
            if not args.out:
                raise ShardError("--shard needs --out DIR (the shard folder)")
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
