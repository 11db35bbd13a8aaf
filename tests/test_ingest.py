"""Stage ingest on the phantom: every listed image accepted or rejected with the right reason, nothing lost."""
from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrsynth.config import FixtureParams, IngestParams
from cxrsynth.data import dicom
from cxrsynth.stages.ingest import ingest
from cxrsynth.data.release import IngestError
from cxrsynth.images import to_square
from cxrsynth.data.layout import CSV_NAMES
from cxrsynth.data.phantom.dataset import generate
from cxrsynth.text.chexpert import OBSERVATIONS
from cxrsynth.text.sections import section_report

FIX = FixtureParams(cohort="t", sizes={"t": 12}, image_defect_fraction=0.08, report_defect_fraction=0.08,
                    contact_sheet_images=2)
ING = IngestParams(image_size=32, grid_images=4)
DEFECT_REASON = {"corrupt_dicom": "corrupt", "truncated_dicom": "truncated", "missing_image": "missing_file"}
REPORT_REASON = {"missing_report": "report_missing", "empty_report": "report_empty",
                 "report_not_utf8": "report_not_utf8"}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    base = tmp_path_factory.mktemp("raw")
    generate(FIX, 0, base / "mimic-cxr", base / "mimic-cxr-jpg", base / "phantom", workers=0)
    truth = [json.loads(x) for x in (base / "phantom" / "ground_truth.jsonl").read_text().splitlines()]
    return base, truth


def _run(base: Path, out: Path, params: IngestParams = ING, workers: int = 0, root: Path | None = None) -> dict:
    return ingest(params, root or base / "mimic-cxr", base / "mimic-cxr-jpg", out, workers=workers)


@pytest.fixture(scope="module")
def ingested(phantom, tmp_path_factory):
    base, truth = phantom
    out = tmp_path_factory.mktemp("interim")
    metrics = _run(base, out)
    return out, metrics, pd.read_parquet(out / "manifest.parquet"), pd.read_parquet(out / "rejected.parquet")


def test_every_bad_input_rejected_for_the_right_reason_and_the_rest_accepted(phantom, ingested):
    _, truth = phantom
    out, metrics, man, rej = ingested
    reasons = dict(zip(rej.dicom_id, rej.reason))
    accepted = set(man.dicom_id)
    for t in truth:
        if t["view"] not in ("PA", "AP"):
            assert reasons[t["dicom_id"]] == "view_excluded"
        elif t["report_defect"]:
            assert reasons[t["dicom_id"]] == REPORT_REASON[t["report_defect"]]
        elif t["defect"]:
            assert reasons[t["dicom_id"]] == DEFECT_REASON[t["defect"]], t
        else:
            assert t["dicom_id"] in accepted, t
    assert metrics["read"] == len(truth) == metrics["accepted"] + metrics["rejected"]
    assert metrics["rejected_by_reason"] == rej.reason.value_counts().sort_index().to_dict()
    assert not set(man.dicom_id) & set(rej.dicom_id)


def test_images_and_manifest_line_up(phantom, ingested):
    base, _ = phantom
    out, metrics, man, _ = ingested
    for split, group in man.groupby("split"):
        arr = np.load(out / f"images_{split}.npy", mmap_mode="r")
        assert arr.dtype == np.uint8 and arr.shape == (len(group), 32, 32)
        assert sorted(group.image_row) == list(range(len(group)))
        r = group.iloc[0]
        want = to_square(dicom.read_dicom(base / "mimic-cxr" / r.path), 32, "pad")
        np.testing.assert_array_equal(arr[r.image_row], want)
    assert metrics["accepted_by_split"] == man.split.value_counts().reindex(
        ["train", "validate", "test"], fill_value=0).to_dict()
    assert (out / "sample_grid.png").stat().st_size > 1000


def test_splits_are_disjoint_by_patient(ingested):
    _, _, man, _ = ingested
    assert man.groupby("subject_id").split.nunique().max() == 1


def test_labels_are_carried_through_unchanged(phantom, ingested):
    base, _ = phantom
    _, _, man, _ = ingested
    chex = pd.read_csv(base / "mimic-cxr" / CSV_NAMES["chexpert"], dtype=str, keep_default_na=False)
    chex = chex.set_index("study_id")
    for r in man.itertuples(index=False):
        row = chex.loc[str(r.study_id)] if str(r.study_id) in chex.index else None
        for obs in OBSERVATIONS:
            got = man.loc[man.dicom_id == r.dicom_id, obs].iat[0]
            want = np.nan if row is None or row[obs] == "" else float(row[obs])
            assert (np.isnan(got) and np.isnan(want)) or got == want, (r.study_id, obs)
    values = set(np.unique(man[list(OBSERVATIONS)].to_numpy()[~np.isnan(man[list(OBSERVATIONS)].to_numpy())]))
    assert values <= {1.0, 0.0, -1.0}


def test_report_sections_come_from_the_official_algorithm(phantom, ingested):
    base, _ = phantom
    _, _, man, _ = ingested
    for r in man.drop_duplicates("study_id").itertuples(index=False):
        text = (base / "mimic-cxr" / r.path).parent.with_suffix(".txt").read_text()
        secs = section_report(text)
        assert r.impression == secs.get("impression", "") and r.findings == secs.get("findings", "")
        assert r.report == text


def test_no_identifier_from_dicom_headers_reaches_outputs(phantom, ingested):
    _, truth = phantom
    out, _, _, _ = ingested
    planted = {v for t in truth for v in t["planted_identifiers"].values()}
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for ident in planted:
        assert ident.encode() not in blob


def test_parallel_and_serial_ingest_agree(phantom, ingested, tmp_path):
    base, _ = phantom
    out, _, man, rej = ingested
    _run(base, tmp_path, workers=2)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "manifest.parquet"), man)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "rejected.parquet"), rej)
    for split in ("train", "validate", "test"):
        np.testing.assert_array_equal(np.load(tmp_path / f"images_{split}.npy"), np.load(out / f"images_{split}.npy"))


def test_jpg_source_and_official_recipe_agree(phantom, tmp_path):
    base, _ = phantom
    a = _run(base, tmp_path / "jpg", replace(ING, source="jpg"))
    b = _run(base, tmp_path / "rec", replace(ING, voi="jpg_recipe"))
    ma, mb = (pd.read_parquet(tmp_path / k / "manifest.parquet") for k in ("jpg", "rec"))
    # the JPG tree has no images for corrupt/truncated/missing DICOMs, and no reports: same acceptance otherwise
    assert set(ma.dicom_id) == set(mb.dicom_id) and a["accepted"] == b["accepted"]
    ia, ib = np.load(tmp_path / "jpg" / "images_train.npy"), np.load(tmp_path / "rec" / "images_train.npy")
    order = ma[ma.split == "train"].set_index("dicom_id").image_row
    other = mb[mb.split == "train"].set_index("dicom_id").image_row
    diff = np.abs(ia[order.to_numpy()].astype(int) - ib[other.reindex(order.index).to_numpy()].astype(int))
    assert diff.mean() < 3  # JPEG quality 95 vs the same recipe without compression


def test_reports_are_found_in_the_zip(phantom, tmp_path):
    base, _ = phantom
    root = tmp_path / "mimic-cxr"
    shutil.copytree(base / "mimic-cxr", root)
    for p in root.rglob("s*.txt"):
        p.unlink()
    m = _run(base, tmp_path / "out", root=root)
    assert m["accepted"] > 0
    # missing and empty reports stay rejected; a missing file is absent from the zip as well
    assert "report_missing" in m["rejected_by_reason"]


def test_one_image_per_study(phantom, tmp_path):
    base, _ = phantom
    m = _run(base, tmp_path, replace(ING, per_study="one"))
    man = pd.read_parquet(tmp_path / "manifest.parquet")
    assert man.study_id.is_unique
    assert m["read"] == m["accepted"] + m["rejected"]


def _copy_root(base: Path, tmp: Path) -> Path:
    root = tmp / "mimic-cxr"
    shutil.copytree(base / "mimic-cxr", root)
    return root


def _rewrite(path: Path, fn) -> None:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = fn(df)
    with gzip.open(path, "wt") as f:
        df.to_csv(f, index=False)


def test_ids_that_disagree_are_rejected_and_extra_columns_tolerated(phantom, tmp_path):
    base, _ = phantom
    root = _copy_root(base, tmp_path)
    victim = {}

    def break_split(df):
        victim["id"] = df.dicom_id.iat[0]
        df.loc[0, "study_id"] = "59999999"
        return df

    _rewrite(root / CSV_NAMES["split"], break_split)
    _rewrite(root / CSV_NAMES["metadata"], lambda df: df.assign(AcquisitionDeviceProcessingDescription="CHEST"))
    m = _run(base, tmp_path / "out", root=root)
    rej = pd.read_parquet(tmp_path / "out" / "rejected.parquet")
    assert rej.set_index("dicom_id").reason[victim["id"]] == "ids_disagree"
    assert m["read"] == m["accepted"] + m["rejected"]


def test_missing_file_or_column_stops_with_its_name(phantom, tmp_path):
    base, _ = phantom
    root = _copy_root(base, tmp_path)
    _rewrite(root / CSV_NAMES["metadata"], lambda df: df.drop(columns=["ViewPosition"]))
    with pytest.raises(IngestError, match="ViewPosition"):
        _run(base, tmp_path / "o1", root=root)
    shutil.copy(base / "mimic-cxr" / CSV_NAMES["metadata"], root / CSV_NAMES["metadata"])
    (root / CSV_NAMES["split"]).unlink()
    with pytest.raises(IngestError, match="mimic-cxr-2.0.0-split.csv.gz: required file missing"):
        ingest(ING, root, tmp_path / "no-jpg-release", tmp_path / "o2", workers=0)


def test_plain_csv_is_read_as_well_as_gzip(phantom, tmp_path):
    base, _ = phantom
    root = _copy_root(base, tmp_path)
    for key in ("records", "split"):
        gz = root / CSV_NAMES[key]
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    assert _run(base, tmp_path / "o", root=root)["accepted"] > 0


def test_to_square_keeps_aspect_and_antialiases():
    img = np.ones((100, 50), np.float32)
    pad = to_square(img, 20, "pad")
    assert pad[:, :4].max() == 0 and pad[:, 6:14].min() == 255  # letterboxed left/right, content in the middle
    assert to_square(img, 20, "crop").min() == 255
    checker = (np.indices((256, 256)).sum(0) % 2).astype(np.float32)
    small = to_square(checker, 16, "pad")
    assert abs(small.mean() - 127.5) < 3 and small.std() < 3  # no aliasing into stripes


def test_dicom_source_finds_the_tables_in_the_jpg_release(phantom, tmp_path):
    """Real MIMIC-CXR (DICOM) has no metadata/split/label tables: they come with MIMIC-CXR-JPG."""
    base, _ = phantom
    root = _copy_root(base, tmp_path)
    for key in ("metadata", "split", "chexpert", "negbio"):
        (root / CSV_NAMES[key]).unlink()
    m = _run(base, tmp_path / "o", root=root)
    assert m["accepted"] > 0 and m["read"] == m["accepted"] + m["rejected"]


def test_identifiers_planted_in_reports_are_redacted(phantom, tmp_path):
    from cxrsynth.data.layout import report_path
    base, truth = phantom
    root = _copy_root(base, tmp_path)
    t = next(t for t in truth if t["view"] in ("PA", "AP") and not t["defect"] and not t["report_defect"])
    name = t["planted_identifiers"]["patient_name"]  # DICOM PersonName, FAMILY^GIVEN
    family, given = name.split("^")[:2]
    rel = report_path(int(t["subject_id"]), int(t["study_id"]))
    text = (root / rel).read_text()
    planted = f"{given.title()} {family.title()} seen by Dr. Quackenbush, MRN: 99120345, call 617-555-0199."
    (root / rel).write_text(text.replace("FINDINGS:", f"FINDINGS: {planted}", 1))
    metrics = _run(base, tmp_path / "out", root=root)
    man = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    row = man[man.study_id == int(t["study_id"])].iloc[0]
    blob = "".join(str(v) for v in man.to_numpy().ravel())
    for ident in (family, given, "Quackenbush", "99120345", "555-0199"):
        assert ident.lower() not in blob.lower(), ident
    assert "___" in row.findings and "seen by" in row.findings
    assert metrics["reports_redacted"] >= 1 and metrics["redactions"] >= 5
    assert _run(base, tmp_path / "off", params=replace(ING, redact=False), root=root)["redactions"] == 0


# ----------------------------------------------------------------------------------------------------------------
# the arrays are written once (sized for the candidates, cut to the accepted rows in place)

def _old_way(path: Path, rows: np.ndarray) -> bytes:
    """What the two-copy writer produced: a fresh open_memmap of the accepted count, filled with the rows."""
    final = np.lib.format.open_memmap(path, mode="w+", dtype=rows.dtype, shape=rows.shape)
    final[:] = rows
    final.flush()
    del final
    return path.read_bytes()


@pytest.mark.parametrize("shape", [(10, 4, 3), (10,), (123456, 2)])
def test_shrink_npy_cuts_rows_in_place_with_the_header_numpy_writes(tmp_path, shape):
    from cxrsynth.data.arrays import shrink_npy

    data = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    for n in (7, 0, shape[0]):
        path = tmp_path / f"a{n}.npy"
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        arr[:] = data
        arr.flush()
        del arr
        size_before = path.stat().st_size
        shrink_npy(path, n)
        got = np.load(path)
        assert got.shape == (n, *shape[1:]) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, data[:n])
        np.testing.assert_array_equal(np.load(path, mmap_mode="r"), data[:n])
        assert path.read_bytes() == _old_way(tmp_path / f"old{n}.npy", data[:n])  # byte for byte
        assert path.stat().st_size == size_before - (shape[0] - n) * data[0].nbytes
    with pytest.raises(ValueError, match="cannot shrink"):
        shrink_npy(tmp_path / "a7.npy", 8)
    with pytest.raises(ValueError, match="cannot shrink"):
        shrink_npy(tmp_path / "a7.npy", -1)


def test_shrink_npy_pads_a_header_without_growth_room(tmp_path):
    """A header written without numpy's spare digits (older numpy) keeps its length: spaces before the newline."""
    from cxrsynth.data.arrays import shrink_npy

    data = np.arange(12 * 5, dtype=np.uint8).reshape(12, 5)
    body = b"{'descr': '|u1', 'fortran_order': False, 'shape': (12, 5), }"
    pad = 64 - (10 + len(body) + 1) % 64
    header = b"\x93NUMPY\x01\x00" + (len(body) + pad + 1).to_bytes(2, "little") + body + b" " * pad + b"\n"
    path = tmp_path / "legacy.npy"
    path.write_bytes(header + data.tobytes())
    shrink_npy(path, 3)
    assert path.read_bytes()[len(header) - 1:len(header)] == b"\n" and path.stat().st_size == len(header) + 15
    np.testing.assert_array_equal(np.load(path), data[:3])


def test_images_equal_the_two_copy_writer_byte_for_byte_and_no_temporary_is_left(ingested, tmp_path):
    out, _, _, _ = ingested
    assert not list(out.glob(".images_*"))
    for split in ("train", "validate", "test"):
        arr = np.load(out / f"images_{split}.npy")
        assert (out / f"images_{split}.npy").read_bytes() == _old_way(tmp_path / f"{split}.npy", arr)


# ----------------------------------------------------------------------------------------------------------------
# the release fingerprint (what dvc.yaml's ingest stage depends on instead of the image trees)

ROOT = Path(__file__).resolve().parents[1]
CODE_SUFFIXES = (".py",)


def _release_copy(base: Path, tmp: Path) -> tuple[Path, Path]:
    root, jpg = tmp / "mimic-cxr", tmp / "mimic-cxr-jpg"
    shutil.copytree(base / "mimic-cxr", root)
    shutil.copytree(base / "mimic-cxr-jpg", jpg)
    return root, jpg


def test_fingerprint_changes_with_a_table_or_checksum_file_not_with_an_image(phantom, tmp_path):
    from cxrsynth.data.release import release_fingerprint
    from cxrsynth.data.layout import write_checksums

    base, truth = phantom
    root, jpg = _release_copy(base, tmp_path)
    fp = release_fingerprint(root, jpg, "dicom")
    assert set(fp) == {f"raw/{n}" for n in CSV_NAMES.values()} | {"raw/mimic-cxr-reports.zip", "raw/SHA256SUMS.txt"} | {
        f"raw_jpg/{CSV_NAMES[k]}" for k in ("metadata", "split", "chexpert", "negbio")} | {"raw_jpg/SHA256SUMS.txt"}
    assert release_fingerprint(root, jpg, "dicom") == fp  # nothing changed: nothing moves
    # the accepted trade-off: an image edited under files/ is not seen while its checksum file stays as it was
    dcm = root / next(t["path"] for t in truth if not t["defect"])
    data = bytearray(dcm.read_bytes())
    data[-1] ^= 0xFF
    dcm.write_bytes(bytes(data))
    assert release_fingerprint(root, jpg, "dicom") == fp
    # ... and is seen once the checksum file is regenerated
    write_checksums(root)
    after = release_fingerprint(root, jpg, "dicom")
    assert {k for k in fp if after[k] != fp[k]} == {"raw/SHA256SUMS.txt"}
    # a release table changes exactly its own entry
    _rewrite(jpg / CSV_NAMES["split"], lambda df: df.iloc[1:])
    again = release_fingerprint(root, jpg, "dicom")
    assert {k for k in fp if again[k] != after[k]} == {f"raw_jpg/{CSV_NAMES['split']}"}
    # the JPG source does not read the DICOM root's copies of the tables
    assert set(release_fingerprint(root, jpg, "jpg")) == set(fp) - {
        f"raw/{CSV_NAMES[k]}" for k in ("metadata", "split", "chexpert", "negbio")}


def test_ingest_records_the_release_in_its_outputs_and_metrics(phantom, ingested):
    from cxrsynth.data.release import release_fingerprint
    from cxrsynth.shards import digest

    base, _ = phantom
    out, metrics, _, _ = ingested
    rec = json.loads((out / "release.json").read_text())
    assert rec["source"] == "dicom"
    assert rec["files"] == release_fingerprint(base / "mimic-cxr", base / "mimic-cxr-jpg", "dicom")
    assert rec["sha256"] == digest(rec["files"]) and metrics["release_sha256"] == rec["sha256"][:16]


def test_dvc_yaml_ingest_depends_on_the_fingerprint_files_not_the_image_trees(phantom):
    import yaml

    from cxrsynth.data.release import release_fingerprint

    base, _ = phantom
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["ingest"]
    data = [d for d in stage["deps"] if not d.endswith(CODE_SUFFIXES)]
    assert all((ROOT / d).is_file() for d in stage["deps"] if d.endswith(CODE_SUFFIXES))
    assert "${paths.raw}" not in data and "${paths.raw_jpg}" not in data
    rel = {}
    for d in data:
        key, _, name = d.partition("}/")
        assert key in ("${paths.raw", "${paths.raw_jpg") and name and "/" not in name, d  # a top-level file, no folder
        rel[f"{key[len('${paths.'):]}/{name}"] = d
    # every dep is a fingerprint file that the phantom has (DVC refuses to run with a missing dep)...
    phantom_fp = release_fingerprint(base / "mimic-cxr", base / "mimic-cxr-jpg", "dicom")
    assert set(rel) <= set(phantom_fp)
    # ... and that a real release has: MIMIC-CXR ships no metadata/split/label tables, only MIMIC-CXR-JPG does
    assert set(rel) == {"raw/cxr-record-list.csv.gz", "raw/cxr-study-list.csv.gz", "raw/mimic-cxr-reports.zip",
                        "raw/SHA256SUMS.txt", "raw_jpg/SHA256SUMS.txt"} | {
        f"raw_jpg/{CSV_NAMES[k]}" for k in ("metadata", "split", "chexpert", "negbio")}


def test_checksums_command_writes_the_physionet_file(phantom, tmp_path, capsys):
    from cxrsynth.__main__ import main
    from cxrsynth.data.layout import CHECKSUMS, read_checksums

    base, _ = phantom
    root = _copy_root(base, tmp_path)
    official = (root / CHECKSUMS).read_text()
    assert main(["checksums", str(root)]) == 2 and "--force" in capsys.readouterr().err  # never silently replaced
    assert main(["checksums", str(root), "--tables-only", "--force"]) == 0
    listed = read_checksums(root / CHECKSUMS)
    assert set(listed) == set(CSV_NAMES.values()) | {"mimic-cxr-reports.zip"}
    assert main(["checksums", str(root), "--force", "--workers", "2"]) == 0
    assert (root / CHECKSUMS).read_text() == official  # the full listing is the phantom's own, byte for byte


def test_merge_refuses_shards_that_read_different_releases(phantom, tmp_path):
    from cxrsynth.stages.ingest import ingest_shard, merge_ingest
    from cxrsynth.data.layout import write_checksums
    from cxrsynth.shards import ShardError

    base, _ = phantom
    root = _copy_root(base, tmp_path)
    write_checksums(root, tables_only=True)  # same tables and images, another checksum file: another release
    ingest_shard(ING, base / "mimic-cxr", base / "mimic-cxr-jpg", tmp_path / "s0", workers=0, index=0, count=2)
    ingest_shard(ING, root, base / "mimic-cxr-jpg", tmp_path / "s1", workers=0, index=1, count=2)
    with pytest.raises(ShardError, match="read different releases"):
        merge_ingest(ING, [tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
