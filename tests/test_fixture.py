"""The phantom dataset: MIMIC-CXR layout exactly, hospital-like DICOMs, images and reports that match the truth."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from cxrsynth.config import FixtureParams
from cxrsynth.data import dicom
from cxrsynth.data.layout import CHECKSUMS, CSV_NAMES, HEADERS, JPG_LIST, REPORTS_ZIP, read_checksums
from cxrsynth.data.phantom.dataset import generate
from cxrsynth.data.phantom.render import render_image
from cxrsynth.data.phantom.truth import Anatomy, Finding, Pose, mask_from_rle
from cxrsynth.eval.geometry import measure_ctr
from cxrsynth.text.chexpert import OBSERVATIONS

# Tiny, but with every encoding represented and defects planted.
TEST_PARAMS = FixtureParams(cohort="t", sizes={"t": 14}, jpeg2000_fraction=0.3, rle_fraction=0.15,
                            image_defect_fraction=0.05, report_defect_fraction=0.05, contact_sheet_images=8)
DX_SOP = "1.2.840.10008.5.1.4.1.1.1.1"
CR_SOP = "1.2.840.10008.5.1.4.1.1.1"
IMAGE_RE = re.compile(r"^files/p1\d/p(1\d{7})/s(5\d{7})/([0-9a-f]{8}(?:-[0-9a-f]{8}){4})\.dcm$")
REPORT_RE = re.compile(r"^files/p1\d/p(1\d{7})/s(5\d{7})\.txt$")


def _make(base: Path, params: FixtureParams, seed: int) -> dict:
    metrics = generate(params, seed, base / "mimic-cxr", base / "mimic-cxr-jpg", base / "phantom", workers=0)
    return {"root": base / "mimic-cxr", "jpg": base / "mimic-cxr-jpg", "extras": base / "phantom",
            "metrics": metrics}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = _make(tmp_path_factory.mktemp("phantom"), TEST_PARAMS, seed=0)
    d["truth"] = [json.loads(line) for line in (d["extras"] / "ground_truth.jsonl").read_text().splitlines()]
    return d


def _csv(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / CSV_NAMES[name], dtype=str, keep_default_na=False)


def test_tables_have_exact_headers_and_agree(ds):
    root = ds["root"]
    for name, header in HEADERS.items():
        with gzip.open(root / CSV_NAMES[name], "rt") as f:
            assert f.readline().rstrip("\n") == ",".join(header), name
    for name in ("metadata", "split", "chexpert", "negbio"):
        with gzip.open(ds["jpg"] / CSV_NAMES[name], "rt") as f:
            assert f.readline().rstrip("\n") == ",".join(HEADERS[name])
    rec, meta, split = _csv(root, "records"), _csv(root, "metadata"), _csv(root, "split")
    assert len(rec) == len(meta) == len(split) == ds["metrics"]["images"] == len(ds["truth"])
    assert set(rec.dicom_id) == set(meta.dicom_id) == set(split.dicom_id)
    for r in rec.itertuples():
        m = IMAGE_RE.match(r.path)
        assert m and m.groups() == (r.subject_id, r.study_id, r.dicom_id)
        assert r.path.split("/")[1] == "p" + r.subject_id[:2]
    stu = _csv(root, "studies")
    assert all(REPORT_RE.match(p) for p in stu.path)
    assert set(stu.study_id) == set(rec.study_id)


def test_tree_contains_exactly_the_listed_files(ds):
    root = ds["root"]
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    top = {p for p in on_disk if "/" not in p}
    assert top == set(CSV_NAMES.values()) | {REPORTS_ZIP, CHECKSUMS}
    listed_images = set(_csv(root, "records").path)
    listed_reports = set(_csv(root, "studies").path)
    by_path = {t["path"]: t for t in ds["truth"]}
    missing_images = {p for p, t in by_path.items() if t["defect"] == "missing_image"}
    missing_reports = {t["report_path"] for t in ds["truth"] if t["report_defect"] == "missing_report"}
    assert missing_images and missing_reports
    assert on_disk - top == (listed_images - missing_images) | (listed_reports - missing_reports)
    with zipfile.ZipFile(root / REPORTS_ZIP) as z:
        assert set(z.namelist()) == listed_reports - missing_reports
    jpgs = (ds["jpg"] / JPG_LIST).read_text().split()
    assert all(p.endswith(".jpg") and (ds["jpg"] / p).is_file() for p in jpgs)
    good = [t for t in ds["truth"] if t["defect"] is None]
    assert len(jpgs) == len(good)


CHECKSUM_LINE = re.compile(r"^[0-9a-f]{64}  [^ ].*$")


@pytest.mark.parametrize("which", ["root", "jpg"])
def test_checksum_file_lists_every_file_of_its_root_and_verifies(ds, which):
    """PhysioNet's SHA256SUMS.txt: `<sha256>  <relative path>` per file, sorted by path, itself excepted."""
    root = ds[which]
    lines = (root / CHECKSUMS).read_text(encoding="utf-8").splitlines()
    assert lines and all(CHECKSUM_LINE.match(x) for x in lines)
    paths = [x.split("  ", 1)[1] for x in lines]
    assert paths == sorted(paths)
    listed = read_checksums(root / CHECKSUMS)
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {CHECKSUMS}
    bad = [rel for rel, digest in listed.items() if hashlib.sha256((root / rel).read_bytes()).hexdigest() != digest]
    assert bad == []
    if which == "jpg":
        assert JPG_LIST in listed and any(p.endswith(".jpg") for p in listed)
    else:
        assert REPORTS_ZIP in listed and any(p.endswith(".dcm") for p in listed) and any(
            p.endswith(".txt") for p in listed)


def test_metadata_value_conventions(ds):
    meta = _csv(ds["root"], "metadata")
    assert set(meta.ViewPosition) <= {"PA", "AP", "LATERAL", "LL"}
    assert {"PA", "AP", "LATERAL"} <= set(meta.ViewPosition)
    for t in meta.StudyTime:
        v = float(t)
        assert repr(v) == t and 0 <= v < 240000
        hh, rest = divmod(int(v), 10000)
        assert hh < 24 and rest // 100 < 60 and rest % 100 < 60
    dates = pd.to_datetime(meta.StudyDate, format="%Y%m%d")
    assert dates.dt.year.between(2110, 2200).all()
    # dates are shifted per patient: one patient's studies span a plausible clinical history, not centuries
    span = dates.groupby(meta.subject_id).agg(lambda d: (d.max() - d.min()).days)
    assert (span < 20 * 365).all()
    assert (meta.Rows != meta.Columns).all()
    assert meta.loc[meta.ViewPosition == "PA", "ViewCodeSequence_CodeMeaning"].eq("postero-anterior").all()
    frontal = meta.ViewPosition.isin(["PA", "AP"]).mean()
    assert 0.5 <= frontal <= 0.9


def test_split_is_by_patient(ds):
    split = _csv(ds["root"], "split")
    assert set(split.split) <= {"train", "validate", "test"}
    assert split.groupby("subject_id").split.nunique().max() == 1
    assert split.groupby("study_id").subject_id.nunique().max() == 1


def test_label_tables_match_reports(ds):
    chex = _csv(ds["root"], "chexpert")
    negbio = _csv(ds["root"], "negbio")
    assert list(chex.columns) == ["subject_id", "study_id", *OBSERVATIONS]
    assert len(chex) == len(negbio)
    values = set(chex[list(OBSERVATIONS)].to_numpy().ravel())
    assert values <= {"1.0", "0.0", "-1.0", ""}
    assert set(chex["No Finding"]) <= {"1.0", ""}
    truth = {str(t["study_id"]): t for t in ds["truth"]}
    labelled = {s for s, t in truth.items() if t["label_row"]}
    assert set(chex.study_id) == labelled
    for row in chex.itertuples(index=False):
        t = truth[row.study_id]
        want = ["" if t["labels"][o] is None else repr(t["labels"][o]) for o in OBSERVATIONS]
        assert list(row)[2:] == want
        if t["report_style"] in ("standard", "legacy", "no_findings", "typo", "wet_read", "addendum"):
            for f in t["findings"]:
                v = t["labels"][f["pathology"]]
                assert v in ((1.0,) if f["report"] == "present" else (1.0, -1.0)), (row.study_id, f)


def test_reports_are_mimic_formatted(ds):
    root = ds["root"]
    texts = 0
    for t in {t["study_id"]: t for t in ds["truth"]}.values():
        p = root / t["report_path"]
        if t["report_defect"] == "missing_report":
            assert not p.exists()
            continue
        raw = p.read_bytes()
        if t["report_defect"] == "empty_report":
            assert raw == b""
            continue
        if t["report_defect"] == "report_not_utf8":
            with pytest.raises(UnicodeDecodeError):
                raw.decode("utf-8")
            continue
        text = raw.decode("ascii")
        texts += 1
        lines = text.split("\n")
        assert text.endswith("\n")
        assert all(len(line) <= 79 for line in lines)
        assert all(line.startswith(" ") for line in lines[:-1])
        assert "FINAL REPORT" in text or t["report_style"] == "headerless"
        assert "PHANTOM" not in text  # names live only in DICOM headers
    assert texts > 10


def test_every_good_dicom_decodes_with_hospital_attributes(ds):
    seen = {"photometric": set(), "ts": set(), "bits": set(), "modality": set()}
    for t in ds["truth"]:
        if t["defect"] is not None:
            continue
        path = ds["root"] / t["path"]
        d = pydicom.dcmread(path)
        px = d.pixel_array
        assert px.shape == (t["rows"], t["columns"]) == (d.Rows, d.Columns)
        assert d.BitsAllocated == 16 and d.BitsStored == t["bits_stored"] and 10 <= d.BitsStored <= 15
        assert int(px.max()) < 2 ** d.BitsStored
        assert d.PhotometricInterpretation == t["photometric"]
        assert d.SOPClassUID == (DX_SOP if t["modality"] == "DX" else CR_SOP)
        assert d.Modality == t["modality"]
        assert d.ViewPosition == t["view"]
        assert "WindowCenter" in d and "WindowWidth" in d
        for uid in (d.SOPInstanceUID, d.StudyInstanceUID, d.SeriesInstanceUID):
            assert uid.startswith("2.25.")
        assert d.ViewCodeSequence[0].CodeMeaning
        assert str(d.PatientName).startswith("PHANTOM^")
        assert d.PatientID == t["planted_identifiers"]["patient_id"]
        assert d.ImageType[:2] == ["DERIVED", "PRIMARY"]
        seen["photometric"].add(d.PhotometricInterpretation)
        seen["ts"].add(d.file_meta.TransferSyntaxUID.name)
        seen["bits"].add(d.BitsStored)
        seen["modality"].add(d.Modality)
    assert seen["photometric"] == {"MONOCHROME1", "MONOCHROME2"}
    assert seen["modality"] == {"CR", "DX"}
    assert len(seen["bits"]) >= 2
    assert any("JPEG 2000" in n for n in seen["ts"]) and any("Little Endian" in n for n in seen["ts"])


def test_bad_inputs_are_listed_and_fail_as_listed(ds):
    kinds = {t["defect"] for t in ds["truth"]} - {None}
    assert kinds == {"corrupt_dicom", "truncated_dicom", "missing_image"}
    expected = {"corrupt_dicom": "corrupt", "truncated_dicom": "truncated", "missing_image": "missing_file"}
    for t in ds["truth"]:
        if t["defect"] is None:
            continue
        with pytest.raises(dicom.DicomReadError) as e:
            dicom.read_dicom(ds["root"] / t["path"])
        assert e.value.reason == expected[t["defect"]], t["path"]
    assert {t["report_defect"] for t in ds["truth"]} - {None} == {"missing_report", "empty_report",
                                                                  "report_not_utf8"}
    m = ds["metrics"]
    assert sum(m["image_defects"].values()) == sum(t["defect"] is not None for t in ds["truth"])


DEVICES = ("et_tube", "ng_tube", "central_line", "picc", "pacemaker")


def _visible(t: dict, f: dict, img: np.ndarray, tmp: Path) -> int:
    """The same patient and acquisition rendered without the finding, stored and decoded the same way: an
    effusion's pixels must be brighter than the same pixels of the normal lung; a device's box must hold
    more near-maximum (metal) pixels than without it."""
    anatomy = Anatomy(**t["anatomy"])
    others = [Finding(**{k: g[k] for k in ("kind", "side", "severity", "location", "report", "change")})
              for g in t["findings"] if g is not f]
    normal = render_image(anatomy, others, t["ctr"], t["view"], Pose(**t["pose"]), t["rows"], t["columns"])
    spec = dicom.DicomSpec(patient_name="X^Y", patient_id="X", study_instance_uid="2.25.1",
                           series_instance_uid="2.25.2", sop_instance_uid="2.25.3", study_date="21000101",
                           study_time="120000", view_position=t["view"], modality=t["modality"],
                           photometric=t["photometric"], bits_stored=t["bits_stored"])
    dicom.write_dicom(tmp / "normal.dcm", normal.image, spec)
    normal_img = dicom.read_dicom(tmp / "normal.dcm")
    if f["kind"] == "effusion":
        mask = mask_from_rle(f["region"]["mask_rle"], t["rows"], t["columns"])
        assert img[mask].mean() > normal_img[mask].mean() + 0.05, (t["path"], f)
    else:
        x0, y0, x1, y1 = f["region"]["box"]
        with_dev, without = img[y0:y1, x0:x1], normal_img[y0:y1, x0:x1]
        # metal is the densest thing on the film: the box holds pixels near the image's own maximum (each image
        # is windowed to its own range, so compare against each image's maximum, not absolute values)
        near_max = int((with_dev >= 0.95 * img.max()).sum())
        before = int((without >= 0.95 * normal_img.max()).sum())
        assert near_max >= 10 and near_max > before, (t["path"], f, near_max, before)
    return 1


def test_images_show_the_ground_truth(ds, tmp_path):
    """Measured on the decoded, display-converted DICOM pixels, not on the painter's own bookkeeping."""
    checked = {"ctr": 0, "effusion": 0, "device": 0}
    for t in ds["truth"]:
        if t["defect"] is not None or t["view"] not in ("PA", "AP"):
            continue
        img = dicom.read_dicom(ds["root"] / t["path"])
        kinds = {f["kind"] for f in t["findings"]}
        if not t["landmarks"]["heart_border_obscured"]:  # a silhouetted heart border cannot be measured by anyone
            ctr = measure_ctr(img)
            assert (ctr > 0.5) == ("cardiomegaly" in kinds), (t["path"], ctr, t["ctr"])
            assert abs(ctr - t["ctr"]) < 0.04
            checked["ctr"] += 1
        for f in t["findings"]:
            if f["kind"] in ("effusion",) + DEVICES:
                checked["effusion" if f["kind"] == "effusion" else "device"] += _visible(t, f, img, tmp_path)
    assert checked["ctr"] >= 8 and checked["effusion"] >= 1 and checked["device"] >= 1


def test_findings_carry_anatomy_and_regions(ds):
    n = 0
    for t in ds["truth"]:
        for f in t["findings"]:
            assert f["anatomy"] and f["pathology"] in OBSERVATIONS
            if t["view"] in ("PA", "AP"):
                x0, y0, x1, y1 = f["region"]["box"]
                assert 0 <= x0 < x1 <= t["columns"] and 0 <= y0 < y1 <= t["rows"]
                n += 1
    assert n > 0


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_dataset(tmp_path):
    small = FixtureParams(cohort="t", sizes={"t": 4}, jpeg2000_fraction=0.3, rle_fraction=0.2,
                          contact_sheet_images=4)
    a = _make(tmp_path / "a", small, seed=3)
    b = _make(tmp_path / "b", small, seed=3)
    c = _make(tmp_path / "c", small, seed=4)
    da, db, dc = (_tree_digest(tmp_path / k) for k in "abc")
    assert da == db
    assert a["metrics"] == b["metrics"]
    assert set(da) != set(dc)
    assert (tmp_path / "a" / "phantom" / "contact_sheet.png").stat().st_size > 10_000


def test_contact_sheet_and_metrics(ds):
    from PIL import Image

    im = Image.open(ds["extras"] / "contact_sheet.png")
    assert im.width >= 6 * 200 and im.height > 200
    m = ds["metrics"]
    assert m["patients"] == 14
    assert sum(m["images_by_view"].values()) == m["images"]
    assert set(m["label_prevalence"]) == set(OBSERVATIONS)
    assert sum(m["patients_by_split"].values()) == m["patients"]


def test_refuses_to_overwrite_a_folder_that_is_not_a_phantom(tmp_path):
    real = tmp_path / "mimic-cxr"
    (real / "files").mkdir(parents=True)
    (real / "files" / "precious.dcm").write_bytes(b"real data")
    with pytest.raises(FileExistsError, match="not a phantom"):
        generate(FixtureParams(cohort="t", sizes={"t": 2}), 0, real, None, tmp_path / "phantom")
    assert (real / "files" / "precious.dcm").read_bytes() == b"real data"


def test_sidecar_statements_explain_the_labels(ds):
    """The labels are what the statements of the section the official sectioner picks say, nothing else."""
    from cxrsynth.text.chexpert import Mention, aggregate
    from cxrsynth.text.sections import conclusion

    studies = {t["study_id"]: t for t in ds["truth"] if t["report_defect"] is None}
    assert studies
    for t in studies.values():
        text = (ds["root"] / t["report_path"]).read_text()
        section, body = conclusion(text)
        stmts = [st for st in t["report_statements"] if st["section"] == section]
        assert stmts, (t["report_path"], section)
        flat = " ".join(body.split())
        assert all(" ".join(st["text"].split()) in flat for st in stmts)
        assert aggregate(Mention(**m) for st in stmts for m in st["mentions"]) == t["labels"]
