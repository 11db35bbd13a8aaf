"""Stage `synthesize`: prompts -> key patches -> image tokens -> synthetic chest X-rays, with lineage.

The stage (`run_stage`) can be split over machines (`cxrsynth.shards`): its work list is the (prompt, sample) list, a
shard samples only its range of it (each image has its own seed, so it equals the unsharded run's), and
`merge_synthesis` rebuilds the outputs of an unsharded run byte for byte (metrics timings aside). A DICOM copy's UIDs
come from a generator seeded by the image's seed, so they too do not depend on which images were made with it.

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

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrsynth.stages import check_outputs
from cxrsynth.config import Params, stage_params
from cxrsynth.data.synthetic_writer import write_images, write_tables
from cxrsynth.io import write_json
from cxrsynth.models.token_sampler import Sampling
from cxrsynth.pipeline import load_models, prompts_from_parquet, prompts_from_reports, synthesize
from cxrsynth.png_archive import TarShards, pixels_sha256
from cxrsynth.shards import ShardError, check_shards, digest, shard_range, stage_arguments, write_shard


def main(argv: list[str] | None = None) -> None:
    params = stage_params()
    try:
        args, shard = stage_arguments("python -m stages.synthesize", __doc__.split("\n")[0], "paths.synthetic",
                                      "<paths.metrics>/synthesize.json", argv)
        out = args.out or params.paths.synthetic
        check_outputs(params, "synthesize", out)
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



def params_sha256(params: Params) -> str:
    """What a shard's outputs depend on among the params: the synthesize section and the base seed."""
    return digest({"synthesize": asdict(params.synthesize), "seed": params.base.seed})


def _clear(out: Path) -> None:
    for old in (out / "images", out / "dicom", out / "png"):  # fixed names: stale files must not linger
        if old.is_dir():
            for f in old.iterdir():
                f.unlink()


def _metrics(params: Params, df: pd.DataFrame, codes: np.ndarray, images: np.ndarray, ctx: dict,
             sample_seconds: float, seconds: float) -> dict:
    from cxrsynth.models.vqgan import code_usage

    p = params.synthesize
    usage = code_usage(codes, ctx["codebook_size"])  # N x H x W grids: position_entropy too
    n_prompts = ctx["prompts"]
    with_kp = float((df.groupby("prompt_id")["n_key_patches"].first() > 0).mean()) if n_prompts else 0.0
    return {"count": int(len(df)), "prompts": n_prompts, "prompt_source": p.prompt_source,
            "samples_per_prompt": p.samples_per_prompt, "device": ctx["device"],
            "images_per_second": round(len(df) / max(sample_seconds, 1e-9), 2),
            "sample_seconds": round(sample_seconds, 2), "seconds": round(seconds, 2),
            "prompts_with_key_patches": round(with_kp, 4),
            "mean_key_patches": round(float(df["n_key_patches"].mean()), 3) if len(df) else 0.0,
            "codes_used": usage["codes_used"], "code_usage": round(usage["usage"], 4),
            "code_perplexity": round(usage["perplexity"], 2),
            "code_position_entropy": round(usage.get("position_entropy", 0.0), 4),  # 0 with no grids
            "mean_pixel": round(float(np.mean(images)), 2),
            **{k: v[:16] for k, v in ctx["hashes"].items()}}


def run_stage(params: Params, out: str | Path, shard: tuple[int, int] | None = None) -> dict:
    """The stage: models, prompts, images, outputs under `out`; returns the metrics. With shard = (I, N) only
    shard I of the (prompt, sample) list, into the shard folder `out` (images/, dicom/, images.npy, codes.npy,
    rows.json and shard.json, whose content it returns)."""
    from cxrsynth.train import pick_device

    p, paths = params.synthesize, params.paths
    t0 = time.perf_counter()
    device = pick_device(params.base.device)
    if device.type == "cpu" and p.cpu_threads:
        torch.set_num_threads(p.cpu_threads)
    gen, vqgan, hashes = load_models(paths.models, device=device)
    if p.prompt_source == "prompts":
        prompts = prompts_from_parquet(pd.read_parquet(Path(paths.prompts) / "prompts.parquet"))
    else:
        prompts = prompts_from_reports(pd.read_parquet(Path(paths.interim) / "manifest.parquet"))
    sampling = Sampling.from_params(p)
    items = shard_range(len(prompts) * p.samples_per_prompt, *shard) if shard else None
    torch.manual_seed(params.base.seed)
    syn = synthesize(gen, vqgan, prompts, sampling, base_seed=params.base.seed,
                     samples_per_prompt=p.samples_per_prompt, hashes=hashes, items=items)
    out = Path(out)
    _clear(out)
    # shards write loose PNGs into their folder; the merge packs them into the layout asked for
    rows = write_images(out, syn.rows, syn.images, write_dicom=p.write_dicom, dicom_seed=params.base.seed,
                        layout="loose" if shard is not None else p.png_layout, shard_size=p.png_shard_size)
    ctx = {"prompts": len(prompts), "codebook_size": gen.layout.codebook_size, "device": device.type,
           "hashes": hashes,
           "title": f"synthetic chest X-rays ({p.prompt_source}; T={p.temperature}, top-k {p.top_k}, "
                    f"top-p {p.top_p}, guidance {p.guidance_scale}; k={gen.layout.key_patches} key patches"
                    + (", forced at their cells)" if p.key_patch_placement == "force" else ")")}
    if shard is None:
        df = write_tables(out, rows, syn.images, sheet_images=p.contact_sheet_images, title=ctx["title"])
        return _metrics(params, df, syn.codes, syn.images, ctx, syn.sample_seconds, time.perf_counter() - t0)
    np.save(out / "images.npy", np.ascontiguousarray(syn.images, dtype=np.uint8), allow_pickle=False)
    np.save(out / "codes.npy", syn.codes, allow_pickle=False)
    (out / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    return write_shard(out, "synthesize", shard[0], shard[1], syn.total, params_sha256=params_sha256(params),
                       work_sha256=syn.work_sha256, **ctx, sample_seconds=syn.sample_seconds,
                       seconds=time.perf_counter() - t0)


def merge_synthesis(params: Params, folders: Sequence[str | Path], out: str | Path) -> dict:
    """Merge the folders of shards 0..N-1 (any order) into the outputs of an unsharded run under `out`; returns the
    metrics (sample_seconds and seconds summed over the shards, the merge's time added to seconds; device: the
    shards' devices)."""
    t0 = time.perf_counter()
    out = Path(out)
    shards = check_shards(folders, "synthesize", params_sha256(params), out=out)
    _clear(out)
    layout = params.synthesize.png_layout
    if layout == "loose":
        (out / "images").mkdir(parents=True, exist_ok=True)
    archive = TarShards(out, params.synthesize.png_shard_size) if layout == "tar" else None
    rows, images, codes = [], [], []
    for s in shards:
        try:
            part = json.loads((s.path / "rows.json").read_text(encoding="utf-8"))
            imgs, cds = np.load(s.path / "images.npy"), np.load(s.path / "codes.npy")
            if not len(part) == len(imgs) == len(cds) == s.stop - s.start:
                raise ShardError(f"{s.name}: {len(part)} rows, {len(imgs)} images and {len(cds)} code grids for "
                                 f"{s.stop - s.start} items")
            for k, row in enumerate(part):
                data = (s.path / row["file"]).read_bytes()
                if hashlib.sha256(data).hexdigest() != row["png_sha256"]:
                    raise ShardError(f"{s.name}: {row['file']} does not match its sha256 in rows.json")
                base = {key: v for key, v in row.items() if key not in ("file", "png_sha256")}  # write_images' order
                if layout == "loose":
                    (out / row["file"]).write_bytes(data)
                elif layout == "tar":
                    member = f"{row['synthetic_id']}.png"
                    part[k] = {**base, "file": archive.add(member, data), "member": member,
                               "png_sha256": row["png_sha256"], "pixels_sha256": pixels_sha256(imgs[k])}
                else:
                    part[k] = {**base, "file": None, "member": None, "png_sha256": None,
                               "pixels_sha256": pixels_sha256(imgs[k])}
                if params.synthesize.write_dicom:
                    name = f"dicom/{row['synthetic_id']}.dcm"
                    (out / "dicom").mkdir(exist_ok=True)
                    shutil.copyfile(s.path / name, out / name)
        except FileNotFoundError as e:
            raise ShardError(f"{s.name}: {e.filename} missing") from None
        rows += part
        images.append(imgs)
        codes.append(cds)
    if archive is not None:
        archive.close()
    images, codes = np.concatenate(images), np.concatenate(codes)
    ctx = shards[0].extra | {"device": ",".join(sorted({s.extra["device"] for s in shards}))}
    df = write_tables(out, rows, images, sheet_images=params.synthesize.contact_sheet_images, title=ctx["title"])
    return _metrics(params, df, codes, images, ctx, sum(s.extra["sample_seconds"] for s in shards),
                    sum(s.extra["seconds"] for s in shards) + time.perf_counter() - t0)
