"""Lineage audit of a synthetic image: `python -m cxrsynth lineage PATH|ID [--verify] [--json]`.

Given a synthetic PNG or DICOM (or a manifest `synthetic_id` / `prompt_id`), `lineage(repo, target)` collects:
- the image: its manifest row (prompt text and terms, key patches, seed, sampling params) and file hash;
- the models that made it (content hashes recorded at synthesis time) and the DVC stage that produced each;
- through `dvc.lock`, every stage upstream of `synthesize` with its command, params, dependencies and outputs (md5
  as DVC recorded them), down to the raw dataset (dependencies no stage produces and that are not source code);
- the git commit of the repository (and whether the working tree has uncommitted changes).

`verify(repo, report)` recomputes what can drift since the image was made and returns the mismatches (empty = all
good): the image file's hash against the manifest's, the model hashes against the files now on disk, and DVC's own
status of every stage in the chain (an output or dependency edited since `dvc.lock` was written).

Reads only: dvc.lock, params.yaml, the synthetic manifest and files, model folders, git metadata.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

import pandas as pd
import yaml

from cxrsynth.errors import UserError
from cxrsynth.io import file_sha256
from cxrsynth.png_archive import pixels_sha256

MODEL_FOLDERS = {"generator": "generator", "vqgan": "vqgan", "align": "align"}
CODE_SUFFIXES = (".py", ".yaml", ".toml", ".txt", ".cfg")


class LineageError(UserError):
    """The target cannot be resolved (not a synthetic image, no manifest, no dvc.lock); one line."""


def _paths(repo: Path) -> dict:
    from cxrsynth.config import load_params

    p = load_params(repo / "params.yaml").paths
    return {"synthetic": Path(p.synthetic), "models": Path(p.models)}


def _synthetic_id_of_file(path: Path) -> str | None:
    if path.suffix.lower() == ".png":
        from PIL import Image

        with Image.open(path) as im:
            info = dict(im.info)
        if info.get("synthetic") != "true":
            raise LineageError(f"{path}: not a cxrsynth synthetic image (no 'synthetic' PNG text)")
        return info.get("synthetic_id")
    if path.suffix.lower() == ".dcm":
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "SYNTHETIC" not in str(ds.get("SeriesDescription", "")).upper():
            raise LineageError(f"{path}: not a cxrsynth synthetic DICOM (series description)")
        return str(ds.get("PatientID", "")) or None
    return None


def find_row(repo: Path, target: str) -> tuple[dict, Path]:
    """The manifest row of a synthetic image given its file, synthetic_id or prompt_id (first sample)."""
    syn = repo / _paths(repo)["synthetic"]
    manifest = syn / "manifest.parquet"
    if not manifest.is_file():
        raise LineageError(f"{manifest}: no synthetic manifest (run `dvc repro synthesize`)")
    df = pd.read_parquet(manifest)
    key = target
    as_path = Path(target)
    if as_path.is_file():
        key = _synthetic_id_of_file(as_path) or as_path.stem
    hit = df[df.synthetic_id == key]
    if hit.empty:
        hit = df[df.prompt_id == key].sort_values("sample")
    if hit.empty:
        raise LineageError(f"{target}: not in {manifest} (neither a synthetic_id, a prompt_id nor one of its files)")
    row = {k: (None if isinstance(v, float) and v != v else v) for k, v in hit.iloc[0].to_dict().items()}
    row["manifest_row"] = int(hit.index[0])  # = its row in images.npy
    for k, v in row.items():
        if hasattr(v, "item"):
            row[k] = v.item()
    return row, syn


def _lock(repo: Path) -> dict:
    lock = repo / "dvc.lock"
    if not lock.is_file():
        raise LineageError(f"{lock}: missing (the pipeline has not been run with DVC)")
    return yaml.safe_load(lock.read_text(encoding="utf-8")).get("stages", {})


def producer(stages: dict, path: str) -> str | None:
    """The stage whose output is `path` or a folder containing it."""
    path = path.rstrip("/")
    for name, st in stages.items():
        for out in st.get("outs", []):
            o = out["path"].rstrip("/")
            if path == o or path.startswith(o + "/"):
                return name
    return None


def upstream(stages: dict, stage: str) -> list[str]:
    """`stage` and every stage it depends on, dependencies first (deterministic order)."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order or name not in stages:
            return
        for dep in stages[name].get("deps", []):
            p = producer(stages, dep["path"])
            if p is not None and p != name:
                visit(p)
        order.append(name)

    visit(stage)
    return order


def git_state(repo: Path) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def lineage(repo: str | Path, target: str) -> dict:
    """Everything known about how one synthetic image was made (see the module docstring)."""
    repo = Path(repo).resolve()
    row, syn = find_row(repo, target)
    stages = _lock(repo)
    image = syn / (row.get("file") or "images.npy")  # no PNG (png_layout none): the images array
    models_dir = _paths(repo)["models"]
    models = {}
    for key, folder in MODEL_FOLDERS.items():
        rel = (models_dir / folder).as_posix()
        models[key] = {"path": rel, "sha256": row.get(f"{key}_sha256"), "stage": producer(stages, rel)}
    synth_stage = producer(stages, (_paths(repo)["synthetic"] / (row.get("file") or "images.npy")).as_posix()) \
        or "synthesize"
    chain = upstream(stages, synth_stage)
    raw = sorted({d["path"] for s in chain for d in stages[s].get("deps", [])
                  if producer(stages, d["path"]) is None and not d["path"].endswith(CODE_SUFFIXES)})
    return {
        "image": {**{k: row.get(k) for k in ("synthetic_id", "prompt_id", "sample", "kind", "text", "view", "seed",
                                              "temperature", "top_k", "top_p", "guidance_scale", "key_patch_placement",
                                              "source_study_id")},
                  "terms": json.loads(row["terms"]) if row.get("terms") else [],
                  "key_patches": json.loads(row["key_patches"]) if row.get("key_patches") else [],
                  "file": image.relative_to(repo).as_posix(), "file_sha256": row.get("png_sha256"),
                  "member": row.get("member"), "manifest_row": row["manifest_row"],
                  "pixels_sha256": row.get("pixels_sha256"),
                  "labels_asked": {k: row[k] for k in _label_columns(row) if row.get(k) is not None}},
        "models": models,
        "stages": {s: {"cmd": stages[s].get("cmd"), "params": stages[s].get("params", {}),
                       "deps": [{"path": d["path"], "md5": d.get("md5")} for d in stages[s].get("deps", [])],
                       "outs": [{"path": o["path"], "md5": o.get("md5")} for o in stages[s].get("outs", [])]}
                   for s in chain},
        "raw_data": [{"path": p, "md5": next(d.get("md5") for s in chain for d in stages[s].get("deps", [])
                                             if d["path"] == p)} for p in raw],
        "git": git_state(repo),
    }


def _label_columns(row: dict) -> list[str]:
    from cxrsynth.text.chexpert import OBSERVATIONS

    return [c for c in OBSERVATIONS if c in row]


def verify(repo: str | Path, report: dict) -> list[str]:
    """Mismatches between the report (what made the image) and what is on disk now; [] when everything agrees."""
    from cxrsynth.pipeline import model_hashes

    repo = Path(repo).resolve()
    problems = []
    img = report["image"]
    image = repo / img["file"]
    where = img["file"] + (f":{img['member']}" if img.get("member") else "")
    if not image.is_file():
        problems.append(f"{img['file']}: image file missing")
    elif img.get("member"):  # a PNG inside a tar shard (png_layout tar)
        try:
            with tarfile.open(image, "r") as tar:
                data = tar.extractfile(img["member"]).read()
        except (OSError, KeyError, AttributeError, tarfile.TarError) as e:
            data = None
            problems.append(f"{where}: cannot read the PNG ({e})")
        if data is not None and hashlib.sha256(data).hexdigest() != img["file_sha256"]:
            problems.append(f"{where}: image edited since it was made (sha256 differs from manifest)")
    elif image.suffix == ".npy":  # no PNG: the image's row of images.npy
        from cxrsynth.data.arrays import NpyRows

        rows = NpyRows(image)
        if img.get("manifest_row") is None or img["manifest_row"] >= len(rows) or \
                pixels_sha256(rows[img["manifest_row"]]) != img.get("pixels_sha256"):
            problems.append(f"{img['file']} row {img.get('manifest_row')}: image edited since it was made "
                            "(pixels_sha256 differs from manifest)")
    elif img["file_sha256"] and file_sha256(image) != img["file_sha256"]:
        problems.append(f"{img['file']}: image edited since it was made (sha256 differs from manifest)")
    m = report["models"]
    now = model_hashes(repo / m["generator"]["path"], repo / m["vqgan"]["path"])
    for key in ("generator", "vqgan", "align"):
        recorded = m[key]["sha256"]
        if recorded and now.get(f"{key}_sha256") != recorded:
            what = "key-patch bank copy in the generator folder" if key == "align" else "weights"
            problems.append(f"{m[key]['path']}: {what} changed since the image was made "
                            f"(recorded {recorded[:12]}, now {str(now.get(f'{key}_sha256'))[:12]})")
    problems += dvc_status(repo, list(report["stages"]))
    return problems


def dvc_status(repo: Path, stages: list[str]) -> list[str]:
    """DVC's own check of the stages: changed outputs / dependencies since dvc.lock was written."""
    from dvc.repo import Repo

    out = []
    with Repo(str(repo)) as r:
        status = r.status(targets=stages)
    for stage, changes in sorted(status.items()):
        for change in changes:
            if isinstance(change, dict):
                for kind, items in change.items():
                    for path, state in (items.items() if isinstance(items, dict) else [(items, "")]):
                        out.append(f"{stage}: {kind}: {path} {state}".strip())
            else:
                out.append(f"{stage}: {change}")
    return out


def format_report(report: dict, problems: list[str] | None = None) -> str:
    img = report["image"]
    lines = [f"synthetic image {img['synthetic_id']}  ({img['file']})",
             f"  prompt {img['prompt_id']} [{img['kind']}], view {img['view']}, seed {img['seed']}, sample "
             f"{img['sample']}",
             f"  sampling: temperature {img['temperature']}, top_k {img['top_k']}, top_p {img['top_p']}, guidance "
             f"{img['guidance_scale']}, key patches {img.get('key_patch_placement') or 'prompt'}",
             "  text: " + " ".join(str(img["text"]).split()),
             "  terms: " + "; ".join(", ".join(f"{k}={v}" for k, v in t.items()) for t in img["terms"]),
             "  key patches: " + (", ".join(f"{k['term']}@({k['row']},{k['col']}) code {k['code']}"
                                            for k in img["key_patches"]) or "none"),
             "models:"]
    for key, m in report["models"].items():
        lines.append(f"  {key:10s} {m['path']}  sha256 {str(m['sha256'])[:16]}  made by stage {m['stage']}")
    lines.append("stages (dependencies first):")
    for name, st in report["stages"].items():
        lines.append(f"  {name}: {st['cmd']}")
        for f, vals in st["params"].items():
            lines.append(f"    params ({f}): " + json.dumps(vals, sort_keys=True))
        data = [d for d in st["deps"] if not d["path"].endswith(CODE_SUFFIXES)]
        code = [d for d in st["deps"] if d["path"].endswith(CODE_SUFFIXES)]
        for d in data:
            lines.append(f"    dep  {d['path']}  md5 {d['md5']}")
        if code:
            lines.append(f"    code {len(code)} files: " + ", ".join(f"{d['path']}@{str(d['md5'])[:8]}" for d in code))
        for o in st["outs"]:
            lines.append(f"    out  {o['path']}  md5 {o['md5']}")
    lines.append("raw data: " + ", ".join(f"{r['path']} (md5 {r['md5']})" for r in report["raw_data"]))
    g = report["git"]
    lines.append(f"git: {g['commit']}" + (" (uncommitted changes)" if g["dirty"] else ""))
    if problems is not None:
        lines.append("verify: OK, everything on disk matches" if not problems else
                     "verify: MISMATCH\n" + "\n".join(f"  - {p}" for p in problems))
    return "\n".join(lines)
