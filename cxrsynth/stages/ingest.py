"""Stage `ingest`: MIMIC-CXR (DICOM or JPG) -> clean, cached training set.

Reads params.yaml (base.num_workers, paths.raw, paths.raw_jpg, paths.interim, ingest.*) and the dataset under
paths.raw / paths.raw_jpg. Writes paths.interim/{manifest.parquet, rejected.parquet, images_<split>.npy,
sample_grid.png, release.json} and metrics/ingest.json.

Under DVC the stage depends on the release's fingerprint files (record/study lists, metadata, split and label tables,
reports zip, each root's SHA256SUMS.txt), not on the image trees: see
cxrsynth.data.release.release_fingerprint.

Scale-out (cxrsynth.shards): `--shard I/N --out DIR` decodes only shard I of N into the shard folder DIR;
`--merge DIR...` merges the folders of shards 0..N-1 into the outputs above (or `--out`, `--metrics`).

In detail. Reads: the record/study lists (DICOM layout) or the metadata table (JPG layout), the metadata, split and chexpert
(or negbio) tables, the reports (beside each study folder, or inside mimic-cxr-reports.zip) and the images.
Writes: `manifest.parquet` (one row per accepted image, row i of its split's array), `images_<split>.npy` (uint8,
N x S x S, memory-mappable), `rejected.parquet` (every listed image that was not used, with the reason), a sample
grid PNG, `release.json` (the release fingerprint: sha256 of the tables, reports zip and SHA256SUMS.txt that were
read; `release_fingerprint`), and returns the metrics. Nothing from a DICOM header but pixels is kept, so no
identifier can leak.

The release fingerprint stands in for the image trees: dvc.yaml's ingest stage depends on those few small files, not
on the ~377k DICOMs (hashing them costs hours). An image edited in place is therefore not noticed unless the root's
SHA256SUMS.txt changes with it (`cxrsynth.data.layout.write_checksums` regenerates one).

Sharded (`ingest_shard`, `merge_ingest`; see `cxrsynth.shards`): every shard runs `collect` (tables, reports,
redaction: cheap and global) and decodes its range of the candidate table; the merge rebuilds the outputs of an
unsharded run byte for byte (metrics timings aside).
"""
from __future__ import annotations

import os
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from cxrsynth.stages import check_outputs
from cxrsynth.config import IngestParams, stage_params
from cxrsynth.data import dicom
from cxrsynth.data.arrays import NpyRows, iter_chunks, shrink_npy
from cxrsynth.data.layout import CSV_NAMES, REPORTS_ZIP, SPLITS, image_path, report_path
from cxrsynth.data.release import RELEASE_FILE, IngestError, read_table, release_record
from cxrsynth.images import to_square
from cxrsynth.io import write_json
from cxrsynth.shards import ShardError, check_shards, digest, shard_range, stage_arguments, write_shard
from cxrsynth.text.chexpert import OBSERVATIONS
from cxrsynth.text.deid import redact
from cxrsynth.text.sections import section_report
from cxrsynth.viz import image_grid


def main(argv: list[str] | None = None) -> None:
    params = stage_params()
    try:
        args, shard = stage_arguments("python -m stages.ingest", __doc__.split("\n")[0], "paths.interim",
                                      "<paths.metrics>/ingest.json", argv)
        out = args.out or params.paths.interim
        check_outputs(params, "ingest", out)
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



SECTION_COLUMNS = ("impression", "findings", "last_paragraph", "comparison", "indication")


IDS = ("subject_id", "study_id", "dicom_id")


def _reject_frame(rows: list[dict]) -> pd.DataFrame:
    cols = ["subject_id", "study_id", "dicom_id", "path", "reason", "detail"]
    return pd.DataFrame(rows, columns=cols).astype(str) if rows else pd.DataFrame({c: pd.Series(dtype=str)
                                                                                    for c in cols})


@dataclass
class Candidates:
    table: pd.DataFrame  # records that passed the table checks, with view, split, labels, report sections
    rejected: list[dict]
    read: int
    redactions: int = 0         # identifiers removed from report text
    reports_redacted: int = 0   # reports with at least one


def _header_names(root: Path, paths: list[str]) -> list[str]:
    """Person names in the DICOM headers of a study's images (unreadable headers are skipped: decoding rejects them)."""
    names: list[str] = []
    for rel in paths:
        try:
            names += dicom.read_dicom_header(root / rel)["person_names"]
        except (dicom.DicomReadError, OSError):
            continue
    return names


def _read_report(root: Path, rel: str, zf: zipfile.ZipFile | None) -> tuple[str | None, str]:
    """(text, '') or (None, reason): beside the study folder first, then inside the reports zip."""
    p = root / rel
    data: bytes | None = None
    if p.is_file():
        data = p.read_bytes()
    elif zf is not None:
        try:
            data = zf.read(rel)
        except KeyError:
            data = None
    if data is None:
        return None, "report_missing"
    if not data.strip():
        return None, "report_empty"
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "report_not_utf8"


def collect(params: IngestParams, root: Path, jpg_root: Path) -> Candidates:
    """Join the tables, check ids, views, splits and reports; every listed image ends accepted or rejected."""
    # The DICOM release has no metadata/split/label tables: MIMIC-CXR-JPG carries them, so look there too.
    tables = [root, jpg_root] if params.source == "dicom" else [jpg_root]
    meta = read_table(tables, "metadata")
    split = read_table(tables, "split")
    labels = read_table(tables, params.labels)
    if params.source == "dicom":
        rec = read_table(root, "records")[["subject_id", "study_id", "dicom_id", "path"]]
    else:
        rec = meta[["subject_id", "study_id", "dicom_id"]].copy()
        rec["path"] = [image_path(int(s), int(t), d, "jpg") for s, t, d in rec[list(IDS)].itertuples(index=False)]
    read = len(rec)
    rejected: list[dict] = []

    def reject(rows: pd.DataFrame, reason: str, detail: str | pd.Series = "") -> None:
        det = detail if isinstance(detail, pd.Series) else pd.Series(detail, index=rows.index)
        for r, d in zip(rows.itertuples(index=False), det):
            rejected.append({"subject_id": r.subject_id, "study_id": r.study_id, "dicom_id": r.dicom_id,
                             "path": r.path, "reason": reason, "detail": d})

    dup = rec.duplicated("dicom_id", keep="first")
    reject(rec[dup], "duplicate_record", "dicom_id listed twice")
    rec = rec[~dup]
    m = meta.drop_duplicates("dicom_id")[["dicom_id", "subject_id", "study_id", "ViewPosition"]]
    s = split.drop_duplicates("dicom_id")[["dicom_id", "subject_id", "study_id", "split"]]
    df = rec.merge(m.rename(columns={"subject_id": "subject_id_meta", "study_id": "study_id_meta"}),
                   on="dicom_id", how="left")
    df = df.merge(s.rename(columns={"subject_id": "subject_id_split", "study_id": "study_id_split"}),
                  on="dicom_id", how="left")
    for table, col in (("metadata", "ViewPosition"), ("split", "split")):
        miss = df[col].isna()
        reject(df[miss], f"not_in_{table}", f"dicom_id absent from {CSV_NAMES[table]}")
        df = df[~miss]
    bad = ((df.subject_id != df.subject_id_meta) | (df.study_id != df.study_id_meta)
           | (df.subject_id != df.subject_id_split) | (df.study_id != df.study_id_split))
    reject(df[bad], "ids_disagree", "subject/study ids differ between record list, metadata and split")
    df = df[~bad].drop(columns=["subject_id_meta", "study_id_meta", "subject_id_split", "study_id_split"])
    unknown = ~df.split.isin(SPLITS)
    reject(df[unknown], "unknown_split", "split " + df.split[unknown])
    df = df[~unknown]
    conflict = df.groupby("subject_id").split.nunique()
    if (conflict > 1).any():
        raise IngestError(f"subject {conflict[conflict > 1].index[0]} appears in more than one split")
    excluded = ~df.ViewPosition.isin(params.views)
    reject(df[excluded], "view_excluded", "ViewPosition " + df.ViewPosition[excluded].replace("", "(empty)"))
    df = df[~excluded]
    if params.per_study == "one":
        rank = df.ViewPosition.map({v: i for i, v in enumerate(params.views)})
        df = df.assign(_rank=rank).sort_values(["study_id", "_rank", "dicom_id"])
        extra = df.duplicated("study_id", keep="first")
        reject(df[extra], "not_selected_in_study", "per_study=one keeps the first preferred view")
        df = df[~extra].drop(columns="_rank")

    # reports: one read per study
    zpath = root / REPORTS_ZIP
    zf = zipfile.ZipFile(zpath) if zpath.is_file() else None
    sections: dict[str, dict] = {}
    report_reason: dict[str, str] = {}
    study_paths = df.groupby("study_id").path.agg(list) if params.source == "dicom" else {}
    redactions = reports_redacted = 0
    try:
        for subj, study in df[["subject_id", "study_id"]].drop_duplicates().itertuples(index=False):
            text, reason = _read_report(root, report_path(int(subj), int(study)), zf)
            if text is None:
                report_reason[study] = reason
            else:
                if params.redact:
                    names = _header_names(root, study_paths[study]) if params.source == "dicom" else []
                    text, n = redact(text, names)
                    redactions, reports_redacted = redactions + n, reports_redacted + (n > 0)
                secs = section_report(text)
                sections[study] = {c: secs.get(c, "") for c in SECTION_COLUMNS} | {"report": text}
    finally:
        if zf is not None:
            zf.close()
    reasons = df.study_id.map(report_reason)
    for reason in sorted(set(report_reason.values())):
        hit = reasons == reason
        reject(df[hit], reason, df[hit].apply(lambda r: report_path(int(r.subject_id), int(r.study_id)), axis=1))
    df = df[reasons.isna()]

    lab = labels.drop_duplicates("study_id", keep="last").set_index("study_id")[list(OBSERVATIONS)]
    lab = lab.replace("", np.nan).astype(float)
    df = df.join(lab, on="study_id")
    sec = pd.DataFrame.from_dict(sections, orient="index")
    df = df.join(sec, on="study_id")
    df = df.rename(columns={"ViewPosition": "view"}).sort_values(["split", "subject_id", "study_id", "dicom_id"])
    return Candidates(df.reset_index(drop=True), rejected, read, redactions, reports_redacted)


def load_image(path: Path, source: str, voi: str) -> np.ndarray:
    """Display image in [0,1] (air dark, bone bright) from a DICOM or a MIMIC-CXR-JPG file."""
    if source == "jpg":
        if not path.is_file():
            raise dicom.DicomReadError(path, "missing_file", dicom.broken_link_detail(path) or "no such file")
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        except (OSError, ValueError) as e:
            raise dicom.DicomReadError(path, "corrupt", f"cannot decode JPEG ({e})") from None
    if voi == "jpg_recipe":
        return dicom.official_jpg_recipe(path).astype(np.float32) / 255.0
    return dicom.read_dicom(path, voi=voi)


def _decode(job: tuple[str, str, str, int, str]) -> tuple[np.ndarray | None, str, str]:
    path, source, voi, size, mode = job
    try:
        return to_square(load_image(Path(path), source, voi), size, mode), "", ""
    except dicom.DicomReadError as e:
        return None, e.reason, e.detail


def _decode_all(jobs: list, workers: int) -> Iterator[tuple[np.ndarray | None, str, str]]:
    if workers <= 1:
        yield from map(_decode, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as ex:
        yield from ex.map(_decode, jobs, chunksize=8)


def _decode_range(df: pd.DataFrame, start: int, stop: int, src_root: Path, params: IngestParams, out: Path,
                  workers: int) -> tuple[np.ndarray, list[str], list[str]]:
    """Decode rows [start, stop) of the candidate table; writes the accepted images, in table order, to
    out/images_<split>.npy and returns per row: accepted, rejection reason, detail. Each array is written once: sized
    for all candidates of its split, filled with the accepted images in order, then cut to them (`shrink_npy`)."""
    part = df.iloc[start:stop]
    ok = np.zeros(len(part), bool)
    reasons, details = [""] * len(part), [""] * len(part)
    size = params.image_size
    for split_name in SPLITS:
        idx = np.flatnonzero(part.split.to_numpy() == split_name)
        path = out / f"images_{split_name}.npy"
        _fresh(path)
        # the header and a sparse body; rows are then written with pwrite, not through a mapping (a mapped write
        # keeps every written page in this process's resident memory: 16 kB per image at 128 px)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(idx), size, size)).flush()
        offset = NpyRows(path).offset
        jobs = [(str(src_root / part.path.iat[i]), params.source, params.voi, size, params.resize) for i in idx]
        n = 0
        results = _decode_all(jobs, workers)
        fd = os.open(path, os.O_WRONLY)
        try:
            for i, (img, reason, detail) in zip(idx, tqdm(results, total=len(jobs), desc=f"ingest {split_name}",
                                                         unit="img")):
                if img is None:
                    reasons[i], details[i] = reason, detail
                    continue
                os.pwrite(fd, np.ascontiguousarray(img, dtype=np.uint8).tobytes(), offset + n * size * size)
                ok[i] = True
                n += 1
        finally:
            os.close(fd)
        shrink_npy(path, n)
    return ok, reasons, details


def _fresh(path: Path) -> None:
    """Remove an earlier output before writing it anew, so that writing never goes through a link into the DVC
    cache (hardlink/symlink cache types) and a shorter new file never keeps an old tail."""
    if path.is_symlink() or path.exists():
        os.unlink(path)


def _finish(params: IngestParams, cand: Candidates, ok: np.ndarray, reasons: Sequence[str], details: Sequence[str],
            out: Path, release: dict) -> dict:
    """Manifest, rejected records, checks, grid and release.json from the decode outcome of every candidate (images
    already in out/images_<split>.npy); returns the metrics without timings."""
    df = cand.table
    rejected_rows = list(cand.rejected)
    rows = np.full(len(df), -1, np.int64)
    for split_name in SPLITS:  # decode failures in the order of an unsharded run: split by split, table order
        in_split = df.split.to_numpy() == split_name
        rows[in_split & ok] = np.arange(int((in_split & ok).sum()))
        for i in np.flatnonzero(in_split & ~ok):
            r = df.iloc[i]
            rejected_rows.append({"subject_id": r.subject_id, "study_id": r.study_id, "dicom_id": r.dicom_id,
                                  "path": r.path, "reason": reasons[i], "detail": details[i]})
    manifest = df[ok].assign(image_row=rows[ok]).reset_index(drop=True)
    manifest = manifest[["subject_id", "study_id", "dicom_id", "split", "view", "path", "image_row",
                         *OBSERVATIONS, *SECTION_COLUMNS, "report"]]
    for c in ("subject_id", "study_id"):
        manifest[c] = manifest[c].astype(np.int64)
    manifest.to_parquet(out / "manifest.parquet", index=False)
    rejected = _reject_frame(rejected_rows).sort_values(["reason", "path"]).reset_index(drop=True)
    rejected.to_parquet(out / "rejected.parquet", index=False)
    _assert_disjoint(manifest)
    if len(manifest) + len(rejected) != cand.read:
        raise AssertionError(f"read {cand.read} != accepted {len(manifest)} + rejected {len(rejected)}")
    _grid(manifest, out, params.grid_images)
    _fresh(out / RELEASE_FILE)
    write_json(out / RELEASE_FILE, release)
    return {
        "release_sha256": release["sha256"][:16],
        "read": cand.read, "accepted": int(len(manifest)), "rejected": int(len(rejected)),
        "rejected_by_reason": dict(sorted(Counter(rejected.reason).items())),
        "accepted_by_split": {s: int((manifest.split == s).sum()) for s in SPLITS},
        "accepted_by_view": dict(sorted(Counter(manifest.view).items())),
        "studies": int(manifest.study_id.nunique()), "patients": int(manifest.subject_id.nunique()),
        "reports_redacted": cand.reports_redacted, "redactions": cand.redactions,
    }


def _rate(decoded: int, seconds: float) -> float | None:
    return round(decoded / seconds, 2) if seconds > 0 else None


def ingest(params: IngestParams, root: str | Path, jpg_root: str | Path, out: str | Path, workers: int) -> dict:
    """Run the whole stage; returns metrics. Outputs go to `out` (see module docstring)."""
    root, jpg_root, out = Path(root), Path(jpg_root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    release = release_record(root, jpg_root, params.source)
    cand = collect(params, root, jpg_root)
    src_root = root if params.source == "dicom" else jpg_root
    t_decode = time.perf_counter()
    ok, reasons, details = _decode_range(cand.table, 0, len(cand.table), src_root, params, out, workers)
    decode_s = time.perf_counter() - t_decode
    metrics = _finish(params, cand, ok, reasons, details, out, release)
    return metrics | {"images_per_second": _rate(len(cand.table), decode_s),
                      "seconds": round(time.perf_counter() - t0, 2)}


def _work_sha256(cand: Candidates) -> str:
    return digest([cand.table.to_dict(orient="split"), cand.rejected, cand.read, cand.redactions,
                   cand.reports_redacted])


def ingest_shard(params: IngestParams, root: str | Path, jpg_root: str | Path, out: str | Path, workers: int,
                 index: int, count: int) -> dict:
    """Shard index/count: `collect` as usual, decode only the shard's rows of the candidate table. Writes to `out`:
    images_<split>.npy (its accepted images), work.parquet (its rows with their outcome), shard 0 also
    collect_rejected.parquet (records rejected by `collect`), and shard.json (returned; with the release record)."""
    root, jpg_root, out = Path(root), Path(jpg_root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    release = release_record(root, jpg_root, params.source)
    cand = collect(params, root, jpg_root)
    n = len(cand.table)
    start, stop = shard_range(n, index, count)
    src_root = root if params.source == "dicom" else jpg_root
    t_decode = time.perf_counter()
    ok, reasons, details = _decode_range(cand.table, start, stop, src_root, params, out, workers)
    decode_s = time.perf_counter() - t_decode
    cand.table.iloc[start:stop].assign(_accepted=ok, _reason=reasons, _detail=details).to_parquet(
        out / "work.parquet", index=False)
    if index == 0:
        _reject_frame(cand.rejected).to_parquet(out / "collect_rejected.parquet", index=False)
    return write_shard(out, "ingest", index, count, n, params_sha256=digest(params), work_sha256=_work_sha256(cand),
                       read=cand.read, redactions=cand.redactions, reports_redacted=cand.reports_redacted,
                       release=release, decode_seconds=round(decode_s, 3), seconds=round(time.perf_counter() - t0, 3))


def merge_ingest(params: IngestParams, folders: Sequence[str | Path], out: str | Path) -> dict:
    """Merge the folders of shards 0..N-1 (any order) into the outputs of an unsharded run under `out`; returns the
    metrics (images_per_second: all shards' decoded images over their summed decode time; seconds: the shards'
    summed time plus the merge's)."""
    t0 = time.perf_counter()
    out = Path(out)
    shards = check_shards(folders, "ingest", digest(params), out=out)
    try:
        parts = [pd.read_parquet(s.path / "work.parquet") for s in shards]
        collected = pd.read_parquet(shards[0].path / "collect_rejected.parquet").to_dict(orient="records")
        arrays = {sp: [NpyRows(s.path / f"images_{sp}.npy") for s in shards] for sp in SPLITS}
    except FileNotFoundError as e:
        raise ShardError(f"shard folder incomplete: {e.filename} missing") from None
    for s, part in zip(shards, parts):
        if len(part) != s.stop - s.start:
            raise ShardError(f"{s.name}: work.parquet holds {len(part)} rows, its range {s.stop - s.start}")
    table = pd.concat([p for p in parts if len(p)] or parts[:1], ignore_index=True)
    ok = table.pop("_accepted").to_numpy(bool)
    reasons, details = table.pop("_reason").tolist(), table.pop("_detail").tolist()
    first = shards[0].extra
    for s in shards:
        if "release" not in s.extra:
            raise ShardError(f"{s.name}: no release fingerprint in its shard.json (written by an older ingest)")
        if s.extra["release"] != first["release"]:
            theirs, ours = s.extra["release"].get("sha256", ""), first["release"].get("sha256", "")
            raise ShardError(f"{s.name} and {shards[0].name} read different releases (release fingerprints "
                             f"{theirs[:12]} != {ours[:12]})")
    cand = Candidates(table, collected, first["read"], first["redactions"], first["reports_redacted"])
    out.mkdir(parents=True, exist_ok=True)
    size = params.image_size
    for split_name in SPLITS:
        for s, part, a in zip(shards, parts, arrays[split_name]):
            want = int(((part.split == split_name) & part._accepted).sum())
            if a.shape != (want, size, size):
                raise ShardError(f"{s.name}: images_{split_name}.npy has shape {a.shape}, expected "
                                 f"{(want, size, size)}")
        _fresh(out / f"images_{split_name}.npy")
        path = out / f"images_{split_name}.npy"
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8,
                                  shape=(sum(len(a) for a in arrays[split_name]), size, size)).flush()
        with open(path, "r+b") as f:  # the shards' rows appended chunk by chunk (no mapping, no full copy)
            f.seek(NpyRows(path).offset)
            for a in arrays[split_name]:
                for _, chunk in iter_chunks(a):
                    f.write(np.ascontiguousarray(chunk).tobytes())
    del arrays
    metrics = _finish(params, cand, ok, reasons, details, out, first["release"])
    decode_s = sum(s.extra["decode_seconds"] for s in shards)
    return metrics | {"images_per_second": _rate(len(table), decode_s),
                      "seconds": round(sum(s.extra["seconds"] for s in shards) + time.perf_counter() - t0, 2)}


def _assert_disjoint(manifest: pd.DataFrame) -> None:
    per = manifest.groupby("subject_id").split.nunique()
    if (per > 1).any():
        raise AssertionError(f"patient {per[per > 1].index[0]} is in more than one split")


def _grid(manifest: pd.DataFrame, out: Path, n: int) -> None:
    arrays = {s: np.load(out / f"images_{s}.npy", mmap_mode="r") for s in SPLITS}
    pick = manifest.head(n)
    imgs = [arrays[r.split][r.image_row] for r in pick.itertuples()]
    caps = [f"{r.split} {r.view} | {r.impression or r.findings or r.last_paragraph}" for r in pick.itertuples()]
    image_grid(imgs, caps, cols=6, tile=192, title="ingested images (as stored) with their impressions").save(
        out / "sample_grid.png")
