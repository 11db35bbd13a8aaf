"""Benchmark: every stage's peak memory against N in minutes, by replicating a finished default run's data.

    python -m bench.replicate                          # factors 8,32 of this workspace's run, every stage
    python -m bench.replicate --factors 8,32 --stages align,evaluate --malloc fixed --out bench/replicate.md

`bench/scale.py` is the proof at scale: it writes a new phantom per size and runs the whole pipeline (~1.5 h on 2
cores for 5k and 20k images). This bench asks the narrower question "what does a stage hold per image?" quickly:

1. from a finished default run (`--source`, default this workspace after `make repro`), a scratch per factor F gets
   F copies of the ingested data: `data/interim` (manifest rows with new dicom, study and subject ids per copy,
   `image_row` shifted; every `images_<split>.npy` repeated), `data/tokens` (repeated, sidecar re-hashed) and the
   phantom's ground truth (records re-keyed); prompts, models and the synthetic set are copied as they are;
2. the stages run in pipeline order in that scratch, from this checkout's code (`PYTHONPATH`), each as its own
   process under `bench.measure` (anonymous-memory peak), with bench/scale.py's reduced training budgets and each
   stage's checkpoints removed first, so each trains and reads what the stage before it wrote;
3. per stage a least-squares line of the anonymous peak over the factors' image counts gives bytes per image.

What replication does not grow: the number of distinct report texts, images and vocabulary terms stays that of one
copy. So a cost per distinct text (the aligner's text-state store: on disk, not in RAM) or per bank key
(~165 keys on the phantom at any size: 144 at 300 patients, 162 at 3,000, 165 at 12,000, counted from the phantom's
reports) is not in the slope; everything held per image row is. The factors should give every split >= 256 images
and the train split >= 2,897 (bench/scale.py's rule for full batches and distance blocks): 8 and 32 do on the
default phantom (503 frontal images per copy).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from bench.scale import BUDGET, CHECKPOINTS, MALLOC_FIXED, MIMIC_IMAGES, STAGES, fit, merge, mib, peak
from cxrsynth.io import file_sha256

ROOT = Path(__file__).resolve().parents[1]
RUN_STAGES = tuple(s for s in STAGES if s != "ingest")  # ingest reads the release, which is not replicated
ID_STEP = 1_000_000_000  # study and subject ids of copy c: + c x ID_STEP (MIMIC ids have 8 digits)


def _repeat_npy(src: Path, dst: Path, factor: int) -> None:
    """dst = src repeated `factor` times along axis 0, written a copy at a time (never the whole in RAM)."""
    a = np.load(src, mmap_mode="r")
    out = np.lib.format.open_memmap(dst, mode="w+", dtype=a.dtype, shape=(len(a) * factor, *a.shape[1:]))
    for c in range(factor):
        out[c * len(a):(c + 1) * len(a)] = a
    out.flush()
    del out


def replicate(source: Path, work: Path, factor: int, params: dict) -> dict[str, int]:
    """Fill `work` with `factor` copies of `source`'s ingested data (see the module doc); returns images per split."""
    if work.exists():
        shutil.rmtree(work)
    paths = params["paths"]
    interim, tokens, phantom = (Path(paths[k]) for k in ("interim", "tokens", "phantom"))
    for d in (interim, tokens, phantom, Path(paths["models"]), Path(paths["metrics"])):
        (work / d).mkdir(parents=True, exist_ok=True)
    man = pd.read_parquet(source / interim / "manifest.parquet")
    counts = man[man.image_row >= 0].groupby("split").size().to_dict()
    copies = []
    for c in range(factor):
        m = man.copy()
        if c:
            m["dicom_id"] = m.dicom_id.astype(str) + f"-r{c}"
            for col in ("study_id", "subject_id"):
                m[col] = m[col] + c * ID_STEP
            m["image_row"] = np.where(m.image_row >= 0, m.image_row + c * m.split.map(counts).fillna(0).astype(int),
                                      m.image_row)
        copies.append(m)
    pd.concat(copies, ignore_index=True).to_parquet(work / interim / "manifest.parquet")
    for f in sorted((source / interim).glob("images_*.npy")):
        _repeat_npy(f, work / interim / f.name, factor)
    for f in (source / interim).iterdir():
        if f.is_file() and f.suffix != ".npy" and f.name != "manifest.parquet":
            shutil.copy2(f, work / interim / f.name)
    meta = json.loads((source / tokens / "tokens.json").read_text())
    for split, entry in meta["splits"].items():
        dst = work / tokens / entry["file"]
        _repeat_npy(source / tokens / entry["file"], dst, factor)
        entry["count"] = int(entry["count"]) * factor
        entry["sha256"] = file_sha256(dst)
        images = work / interim / f"images_{split}.npy"
        if images.is_file():
            entry["images_sha256"] = file_sha256(images)
    meta["counts"] = {s: int(v["count"]) for s, v in meta["splits"].items()}
    (work / tokens / "tokens.json").write_text(json.dumps(meta, indent=2) + "\n")
    truth = source / phantom / "ground_truth.jsonl"
    if truth.is_file():
        with open(truth, encoding="utf-8") as f, open(work / phantom / truth.name, "w", encoding="utf-8") as g:
            lines = [x for x in f if x.strip()]
            for c in range(factor):
                for line in lines:
                    r = json.loads(line)
                    if c:
                        r["dicom_id"] = f"{r['dicom_id']}-r{c}"
                    g.write(json.dumps(r) + "\n")
    for key in ("prompts", "synthetic"):
        if (source / paths[key]).is_dir():
            shutil.copytree(source / paths[key], work / paths[key])
    for name in ("vqgan", "classifier", "align", "generator"):
        if (source / paths["models"] / name).is_dir():
            shutil.copytree(source / paths["models"] / name, work / paths["models"] / name)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return {k: int(v) * factor for k, v in counts.items()}


def run_stages(work: Path, stages: tuple[str, ...], malloc: str) -> list[dict]:
    log = work / "measure.jsonl"
    log.unlink(missing_ok=True)
    env = {**os.environ, "CXRSYNTH_MEASURE_LOG": str(log), "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    if malloc == "fixed":
        env.update(MALLOC_FIXED)
    for stage in stages:
        if stage in CHECKPOINTS:
            shutil.rmtree(work / "models" / CHECKPOINTS[stage], ignore_errors=True)
        t = time.perf_counter()
        with open(work / f"{stage}.log", "w") as out:
            res = subprocess.run([sys.executable, "-m", "bench.measure", stage, f"stages.{stage}"], cwd=work,
                                 env=env, stdout=out, stderr=subprocess.STDOUT)
        if res.returncode:
            raise SystemExit(f"{stage} failed in {work} (exit {res.returncode}): see {work / (stage + '.log')}")
        print(f"[{work.name}] {stage} {time.perf_counter() - t:.0f} s", flush=True)
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()]


def report(results: list[dict], source: Path, malloc: str) -> str:
    names = [f"x{r['factor']}" for r in results]
    lines = [f"# Stage memory per image by replication ({time.strftime('%Y-%m-%d')}, `python -m bench.replicate`)",
             "", f"Source run: `{source}` ({results[0]['images'] // results[0]['factor']:,} frontal images per copy). "
             "Sizes: " + ", ".join(f"x{r['factor']} {r['images']:,} images (" + ", ".join(
                 f"{k} {v:,}" for k, v in sorted(r["split_counts"].items())) + ")" for r in results) + ".", "",
             "Anonymous-memory peak per stage process (MiB), wall seconds, the least-squares bytes per image over the "
             f"sizes and the extrapolation to {MIMIC_IMAGES:,} images (fixed + slope x N; distinct texts, images and "
             "vocabulary stay one copy's, see bench/replicate.py). Allocator: "
             + ("glibc thresholds fixed at 128 KiB (the live heap)." if malloc == "fixed" else "glibc defaults."), "",
             "| stage | " + " | ".join(f"anon {n}" for n in names) + " | " + " | ".join(f"s {n}" for n in names)
             + " | bytes/image | at 377k images |", "|---|" + "---:|" * (2 * len(names) + 2)]
    for stage in RUN_STAGES:
        recs = [r["stages"].get(stage) for r in results]
        if any(v is None for v in recs):
            continue
        c, m = fit([r["images"] for r in results], [peak(v) for v in recs])
        lines.append(f"| {stage} | " + " | ".join(mib(peak(v)) for v in recs) + " | "
                     + " | ".join(f"{v['seconds']:.0f}" for v in recs) + f" | {m:,.0f} | {mib(c + m * MIMIC_IMAGES)}"
                     " MiB |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(ROOT), help="a finished default run (after make repro)")
    ap.add_argument("--factors", default="8,32", help="comma-separated copy counts (at least two)")
    ap.add_argument("--stages", default=",".join(RUN_STAGES), help="comma-separated, run in pipeline order")
    ap.add_argument("--workdir", default="/tmp/cxrsynth-replicate")
    ap.add_argument("--malloc", choices=("default", "fixed"), default="default")
    ap.add_argument("--out", default="", help="markdown table (default: print only)")
    ap.add_argument("--json", default="", help="raw results")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folders")
    args = ap.parse_args(argv)
    try:
        factors = [int(x) for x in args.factors.split(",") if x]
    except ValueError:
        ap.error(f"--factors: expected comma-separated integers, got {args.factors!r}")
    if len(factors) < 2 or min(factors) < 1:
        ap.error("--factors: at least two copy counts >= 1 are needed for a slope")
    stages = tuple(x for x in args.stages.split(",") if x)
    if set(stages) - set(RUN_STAGES):
        ap.error(f"--stages: unknown {sorted(set(stages) - set(RUN_STAGES))} (one of {', '.join(RUN_STAGES)})")
    stages = tuple(s for s in RUN_STAGES if s in stages)
    source = Path(args.source).resolve()
    if not (source / "params.yaml").is_file():
        ap.error(f"--source {source}: no params.yaml (a checkout after `make repro`)")
    params = merge(yaml.safe_load((source / "params.yaml").read_text()), BUDGET)
    if not (source / params["paths"]["interim"] / "manifest.parquet").is_file():
        ap.error(f"--source {source}: no ingested data (run `make repro` there first)")
    results = []
    for f in factors:
        work = Path(args.workdir) / f"x{f}"
        t = time.perf_counter()
        counts = replicate(source, work, f, params)
        print(f"[x{f}] {sum(counts.values()):,} images replicated ({time.perf_counter() - t:.0f} s)", flush=True)
        recs = run_stages(work, stages, args.malloc)
        results.append({"factor": f, "images": sum(counts.values()), "split_counts": counts,
                        "stages": {r["label"]: r for r in recs}, "malloc": args.malloc})
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = report(results, source, args.malloc)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
