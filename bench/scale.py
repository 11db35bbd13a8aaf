"""Benchmark: every stage's peak memory, time and disk at three dataset sizes, and the extrapolation to MIMIC-CXR.

    python -m bench.scale [--sizes small=40,default=300,large=12000] [--workdir /tmp/cxrsynth-scale]
                          [--out bench/scale.md] [--keep]
    python -m bench.scale --sizes med=3000,large=12000 --reuse med,large --rerun codebook,classifier \
                          --malloc fixed --out bench/scale-fixed.md --json bench/scale-fixed.json

For each size (phantom patients), in a scratch copy of this working tree (code, dvc.yaml, params.yaml; no data):
1. write the phantom directly (`stages.fixture`, outside DVC, as a user's download would be: at MIMIC scale the
   release is not a DVC output), at `fixture.image_scale` 0.05, frontal views only, no JPG tree;
2. `dvc repro` the rest of the pipeline with every stage's command wrapped in `bench.measure` (peak RSS of the
   stage process from `os.wait4`, wall seconds), under the same reduced training budgets at every size (steps and
   epochs do not change what a stage holds per image; they only make the large run fit the bench);
3. time a no-op `dvc status` (twice; the second is reported) and `du` the outputs and the DVC cache.

Then, per stage, a least-squares line of peak RSS against the number of accepted images gives the fixed cost and
the bytes per image, and the extrapolation to 377,110 images. Target: every slope <= 2 kB per image; `dvc status`
at the large size within 2x of the default's. Writes the markdown table to --out and prints it.

`--malloc fixed` runs the stages with glibc's mmap and trim thresholds fixed at 128 KiB
(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`; pyarrow on the system allocator): every block over 128 KiB is its own mapping, returned to the
kernel when freed, so the anonymous peak is what the code holds live (measured: codebook at 5,114 images, 511 MiB
against memray's 516 MiB high-water mark) and not what the allocator kept of freed blocks (767-832 MiB over four
default runs). It is a measurement mode, ~1.5x slower (bench/generator.py), not a setting for users. With
`--reuse`, `--rerun STAGE,...` runs those stages again in the kept scratch (their checkpoints removed, so they
train again) and the table holds only them.

All stages run single-process (`base.num_workers: 0`, one torch thread per the stages' own settings), so each
stage's peak is one process's.
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
MIMIC_IMAGES = 377_110
STAGES = ("ingest", "classifier", "prompts", "codebook", "tokens", "align", "generator", "synthesize", "evaluate")

# the same reduced budgets at every size (memory per image does not depend on them)
BUDGET = {
    "base": {"num_workers": 0},
    "fixture": {"image_scale": 0.05, "lateral_fraction": 0.0, "jpeg2000_fraction": 0.0,
                "contact_sheet_images": 8},
    "codebook": {"steps": 40, "eval_every": 20, "checkpoint_every": 20, "disc_start": 20, "warmup_steps": 5},
    "classifier": {"epochs": 1, "bootstrap": 100, "checkpoint_every_epochs": 1},
    "align": {"steps": 20, "eval_every": 10, "checkpoint_every": 10, "warmup_steps": 5},
    "generator": {"steps": 20, "eval_every": 10, "checkpoint_every": 10},
    "prompts": {"paired": False, "n_sampled": 100},
    "evaluate": {"utility_epochs": 1, "bootstrap": 100, "kid_subsets": 20},
}


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True)
    if check and res.returncode:
        sys.stderr.write(res.stdout[-4000:] + res.stderr[-4000:])
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd} (exit {res.returncode})")
    return res


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, text=True, capture_output=True,
                         check=True).stdout.split("\n")
    skip = ("data/", "models/", "metrics/", "dvclive/", ".dvc/cache", "dvc.lock")
    return [f for f in out if f and not f.startswith(skip) and (ROOT / f).is_file()]


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def scratch(work: Path, patients: int) -> Path:
    """A fresh copy of the code with the bench's params and a dvc.yaml whose stages run under bench.measure."""
    for d in (work, work.parent / f"{work.name}-release"):
        if d.exists():
            shutil.rmtree(d)
    work.mkdir(parents=True)
    for f in tracked_files():
        (work / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, work / f)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = merge(params, BUDGET)
    params["fixture"]["sizes"] = {**params["fixture"]["sizes"], "scale": patients}
    params["fixture"]["cohort"] = "scale"
    # the release lives outside the workspace, as a user's download does: DVC walks every folder of its workspace
    # on each `status` to find pipeline files (measured: 16k phantom folders inside it made a no-op status 2.7x
    # slower at 5k images); only the files ingest lists as deps are read
    release = work.parent / f"{work.name}-release"
    for key, sub in (("raw", "mimic-cxr"), ("raw_jpg", "mimic-cxr-jpg"), ("phantom_raw", "mimic-cxr"),
                     ("phantom_raw_jpg", "mimic-cxr-jpg"), ("phantom", "phantom")):
        params["paths"][key] = str(release / sub)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    del dvc["stages"]["fixture"]  # the release is input data here, not a DVC output
    for name, st in dvc["stages"].items():
        st["cmd"] = f"python -m bench.measure {name} stages.{name}"
        st["deps"] = [d for d in st.get("deps", [])]
    (work / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    shutil.rmtree(work / ".dvc", ignore_errors=True)
    run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], work)
    for key, value in (("core.analytics", "false"), ("core.check_update", "false")):
        run([sys.executable, "-m", "dvc", "config", key, value], work)
    src_cfg = ROOT / ".dvc" / "config"
    for line in src_cfg.read_text().splitlines():  # the repo's cache type, if it sets one
        if line.strip().startswith("type") and "=" in line:
            run([sys.executable, "-m", "dvc", "config", "cache.type", line.split("=", 1)[1].strip()], work)
    return work


def du(path: Path) -> int:
    if not path.exists():
        return 0
    return int(run(["du", "-sb", str(path)], path.parent).stdout.split()[0])


MALLOC_FIXED = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
                "ARROW_DEFAULT_MEMORY_POOL": "system"}  # pyarrow's own pool (jemalloc/mimalloc) keeps freed blocks too
CHECKPOINTS = {"classifier": "classifier_checkpoints", "codebook": "vqgan_checkpoints",
               "generator": "generator_checkpoints", "align": "align_checkpoints"}


def one_size(name: str, patients: int, workdir: Path, reuse: bool = False, rerun: tuple[str, ...] = (),
             malloc: str = "default") -> dict:
    """Run one size in a fresh scratch copy; `reuse`: read the stage records of a kept scratch instead (after
    `dvc commit`, so the status below sees what its stages wrote), or, with `rerun`, run those stages again there
    and read only their records."""
    work = workdir / name if reuse else scratch(workdir / name, patients)
    log = work / ("measure.jsonl" if not rerun else f"measure-rerun-{malloc}.jsonl")
    env = {**os.environ, "CXRSYNTH_MEASURE_LOG": str(log), "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    if malloc == "fixed":
        env.update(MALLOC_FIXED)
    t0 = time.perf_counter()
    if reuse:
        if not (work / "measure.jsonl").is_file():
            raise SystemExit(f"--reuse {name}: {work / 'measure.jsonl'} missing")
        run([sys.executable, "-m", "dvc", "commit", "-f", "-q"], work, env)
        if rerun:
            log.unlink(missing_ok=True)
        for stage in rerun:
            if stage in CHECKPOINTS:
                shutil.rmtree(work / "models" / CHECKPOINTS[stage], ignore_errors=True)
            run([sys.executable, "-m", "dvc", "repro", "-f", "-s", "-q", stage], work, env)
            print(f"[{name}] {stage} re-run ({time.perf_counter() - t0:.0f} s)", flush=True)
    else:
        run([sys.executable, "-m", "bench.measure", "fixture", "stages.fixture"], work, env)
        print(f"[{name}] phantom written ({time.perf_counter() - t0:.0f} s)", flush=True)
        res = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env, text=True,
                             stdout=open(work / "repro.log", "w"), stderr=subprocess.STDOUT)
        if res.returncode:
            raise SystemExit(f"[{name}] dvc repro failed: see {work / 'repro.log'}")
        print(f"[{name}] pipeline done ({time.perf_counter() - t0:.0f} s)", flush=True)
    status = []
    for _ in range(2):
        t = time.perf_counter()
        out = run([sys.executable, "-m", "dvc", "status"], work, env).stdout
        status.append(time.perf_counter() - t)
    records = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]  # a stage run twice: the last
    ingest = json.loads((work / "metrics" / "ingest.json").read_text())
    disk = {"raw": du(work.parent / f"{work.name}-release"), "interim": du(work / "data" / "interim"),
            "tokens": du(work / "data" / "tokens"), "synthetic": du(work / "data" / "synthetic"),
            "models": du(work / "models"), "dvc_cache": du(work / ".dvc" / "cache")}
    return {"name": name, "patients": patients, "images": int(ingest["accepted"]), "read": int(ingest["read"]),
            "stages": {r["label"]: r for r in records}, "status_seconds": status[-1],
            "status_first_seconds": status[0], "status_output": out.strip()[:200], "disk": disk,
            "split_counts": ingest.get("accepted_by_split", {}), "work": str(work), "reused": reuse,
            "malloc": malloc, "rerun": list(rerun)}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line."""
    a = np.vstack([np.ones(len(xs)), np.asarray(xs, float)]).T
    (c, m), *_ = np.linalg.lstsq(a, np.asarray(ys, float), rcond=None)
    return float(c), float(m)


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


FULL_SPLIT = 256  # a size enters the slope fit when each of its splits fills the stages' largest batch


def full_block_train() -> int:
    """Train images at which one float64 distance block of train x train (classifier's floor, evaluate's nearest
    neighbours, PRDC radii) reaches `cxrsynth.eval.metrics.CHUNK_BYTES`: below it the block, a fixed cost at
    scale, grows with N and would read as a slope."""
    from cxrsynth.eval.metrics import CHUNK_BYTES

    return int(np.ceil(np.sqrt(CHUNK_BYTES / 8)))


def in_fit(r: dict) -> bool:
    counts = r.get("split_counts") or {}
    return bool(counts) and min(counts.values()) >= FULL_SPLIT and counts.get("train", 0) >= full_block_train()


def peak(rec: dict) -> int:
    """The figure fitted: the anonymous-memory peak where bench.measure could read it, else ru_maxrss."""
    return int(rec.get("max_anon_bytes", rec["max_rss_bytes"]))


def report(results: list[dict]) -> str:
    names = [r["name"] for r in results]
    full = [r for r in results if in_fit(r)]
    if len(full) < 2:  # not enough sizes with full batches: fit over all of them (and say so)
        full = results
    lines = [f"# Stage memory, time and disk against dataset size ({time.strftime('%Y-%m-%d')}, `python -m "
             f"bench.scale`)", "",
             "Sizes (accepted frontal images): " + ", ".join(
                 f"{r['name']} {r['images']:,} ({r['patients']:,} patients; "
                 + ", ".join(f"{k} {v:,}" for k, v in sorted(r.get("split_counts", {}).items())) + ")"
                 for r in results) + ".", "",
             "Per stage process: the anonymous-memory peak (RssAnon + RssShmem, MiB: what RAM must hold; file pages "
             "of memory-mapped inputs are not in it), the `ru_maxrss` peak (MiB, file pages included), wall seconds, "
             "the bytes per image of the anonymous peak fitted (least squares) over the sizes whose every split holds "
             f">= {FULL_SPLIT} images and whose train split >= {full_block_train():,} (" + ", ".join(
                 r["name"] for r in full) + "; a smaller size runs partial batches, or distance blocks smaller than "
             "their 64 MiB cap, so its peak is lower for a reason that does not grow with N), and the extrapolation to "
             f"MIMIC-CXR's {MIMIC_IMAGES:,} images (fixed + slope x N). Reduced training budgets at every size "
             "(bench/scale.py: BUDGET), one process per stage."
             + (" Allocator: glibc thresholds fixed at 128 KiB (`--malloc fixed`): the anonymous peak is the live "
                "heap, not what the allocator retained of freed blocks." if results[0].get("malloc") == "fixed"
                else " Allocator: glibc defaults (what a user's run holds, freed blocks the allocator keeps "
                     "included)."), "",
             "| stage | " + " | ".join(f"anon {x}" for x in names) + " | " + " | ".join(f"RSS {x}" for x in names)
             + " | " + " | ".join(f"s {x}" for x in names) + " | bytes/image | at 377k images |",
             "|---|" + "---:|" * (3 * len(names) + 2)]
    worst, worst_stage = -np.inf, ""
    for stage in ("fixture", *STAGES):
        recs = [r["stages"].get(stage) for r in results]
        if any(v is None for v in recs):
            continue
        c, m = fit([r["images"] for r in full], [peak(r["stages"][stage]) for r in full])
        if stage != "fixture" and m > worst:
            worst, worst_stage = m, stage
        lines.append(f"| {stage} | " + " | ".join(mib(peak(v)) for v in recs) + " | "
                     + " | ".join(mib(v["max_rss_bytes"]) for v in recs) + " | "
                     + " | ".join(f"{v['seconds']:.0f}" for v in recs)
                     + f" | {m:,.0f} | {mib(c + m * MIMIC_IMAGES)} MiB |")
    lines += ["", f"Largest slope of a pipeline stage (fixture excluded: at MIMIC scale the release is given): "
                  f"{worst:,.0f} bytes per image ({worst_stage}; target <= 2,048).", ""]
    lines += ["| size | `dvc status` (s, warm) | first `dvc status` (s) | release | interim | tokens | synthetic | "
              "models | DVC cache |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        d = r["disk"]
        lines.append(f"| {r['name']} | {r['status_seconds']:.2f} | {r['status_first_seconds']:.2f} | "
                     + " | ".join(f"{mib(d[k])} MiB" for k in ("raw", "interim", "tokens", "synthetic", "models",
                                                              "dvc_cache")) + " |")
    if len(results) > 1:
        base, big = results[-2], results[-1]
        ratio = big["status_seconds"] / max(base["status_seconds"], 1e-9)
        lines += ["", f"`dvc status` at {big['name']} / at {base['name']}: {ratio:.2f}x (target <= 2x)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="small=40,default=300,large=12000",
                    help="name=patients,... (at least two sizes)")
    ap.add_argument("--workdir", default="/tmp/cxrsynth-scale")
    ap.add_argument("--out", default=str(ROOT / "bench" / "scale.md"))
    ap.add_argument("--json", default=str(ROOT / "bench" / "scale.json"), help="raw results")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copies")
    ap.add_argument("--reuse", default="", help="comma-separated size names whose kept scratch (--workdir/NAME, "
                    "its measure.jsonl) is read instead of run again")
    ap.add_argument("--report", default="", metavar="JSON[,JSON...]",
                    help="only write the table from earlier --json files (sizes merged, in order of images)")
    ap.add_argument("--rerun", default="", help="with --reuse: comma-separated stages to run again in the kept "
                    "scratches (checkpoints removed); the table holds only them")
    ap.add_argument("--malloc", choices=("default", "fixed"), default="default",
                    help="fixed: glibc mmap/trim thresholds fixed at 128 KiB, so the peak is the live heap")
    args = ap.parse_args()
    rerun = tuple(x for x in args.rerun.split(",") if x)
    if set(rerun) - set(STAGES):
        ap.error(f"--rerun: unknown stages {sorted(set(rerun) - set(STAGES))} (one of {', '.join(STAGES)})")
    if args.report:
        merged = [r for f in args.report.split(",") if f for r in json.loads(Path(f).read_text())]
        text = report(sorted(merged, key=lambda r: r["images"]))
        Path(args.out).write_text(text)
        print(text)
        return
    sizes = []
    for part in args.sizes.split(","):
        name, _, n = part.partition("=")
        if not n.isdigit() or int(n) < 2:
            ap.error(f"--sizes: expected name=patients with patients >= 2, got {part!r}")
        sizes.append((name, int(n)))
    if len(sizes) < 2:
        ap.error("--sizes: at least two sizes are needed for a slope")
    reuse = {x for x in args.reuse.split(",") if x}
    if reuse - {n for n, _ in sizes}:
        ap.error(f"--reuse: {sorted(reuse - {n for n, _ in sizes})} not among --sizes")
    if rerun and reuse != {n for n, _ in sizes}:
        ap.error("--rerun needs every size in --reuse (it re-runs stages in kept scratches)")
    results = []
    for name, patients in sizes:
        r = one_size(name, patients, Path(args.workdir), reuse=name in reuse, rerun=rerun, malloc=args.malloc)
        results.append(r)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        if not args.keep and name not in reuse:
            shutil.rmtree(r["work"], ignore_errors=True)
            shutil.rmtree(f"{r['work']}-release", ignore_errors=True)
    text = report(results)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
