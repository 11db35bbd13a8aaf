"""Write the phantom MIMIC-CXR dataset to disk.

Reads: FixtureParams + seed. Writes under `root` (MIMIC-CXR layout: files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.dcm,
the report sNNNNNNNN.txt beside each study folder, cxr-record-list.csv.gz, cxr-study-list.csv.gz,
mimic-cxr-reports.zip, the mimic-cxr-2.0.0-{metadata,split,chexpert,negbio}.csv.gz tables and PhysioNet's
SHA256SUMS.txt over all of them), optionally a MIMIC-CXR-JPG tree under `jpg_root` (official recipe; its own
SHA256SUMS.txt), and under `extras` the ground-truth sidecar
(ground_truth.jsonl, one record per image) and contact_sheet.png. Returns the counts for metrics/fixture.json.
"""
from __future__ import annotations

import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cxrsynth.config import FixtureParams
from cxrsynth.data import dicom
from cxrsynth.data.layout import (CSV_NAMES, JPG_LIST, LABEL_HEADER, METADATA_HEADER, RECORD_HEADER, REPORTS_ZIP,
                                  SPLIT_HEADER, STUDY_HEADER, image_path, report_path, study_dir, write_checksums)
from cxrsynth.data.phantom.contact_sheet import contact_sheet
from cxrsynth.data.phantom.render import render_image
from cxrsynth.data.phantom.reports import write_report
from cxrsynth.data.phantom.sampler import ORIENTATION, VIEW_CODE, PatientTruth, sample_dataset
from cxrsynth.data.phantom.truth import TRUTH_FILE, StudyTruth, finding_anatomy
from cxrsynth.io import write_csv, write_jsonl, write_zip
from cxrsynth.text.chexpert import OBSERVATIONS

@dataclass
class PatientResult:
    patient: PatientTruth  # regions, landmarks and labels filled in
    reports: dict[int, str]  # study_id -> report text (also for defective ones: what would have been written)
    impressions: dict[int, str]  # study_id -> the report's conclusion line, for the contact sheet
    statements: dict[int, list[dict]]  # study_id -> every sentence with its section and CheXpert mentions


def _spec(p: PatientTruth, s: StudyTruth, im, n: int, rng: np.random.Generator) -> dicom.DicomSpec:
    return dicom.DicomSpec(
        patient_name=p.patient_name, patient_id=p.patient_id, patient_sex=p.anatomy.sex,
        patient_birth_date=f"{p.birth_year}0101", accession_number=f"PHA{s.study_id}",
        study_instance_uid=dicom.make_uid(np.random.default_rng([s.study_id, 1])),
        series_instance_uid=dicom.make_uid(np.random.default_rng([s.study_id, 2, n])),
        sop_instance_uid=dicom.make_uid(rng),
        study_date=s.study_date, study_time=f"{s.study_time:013.6f}", view_position=im.view,
        modality=im.modality, photometric=im.photometric, bits_stored=im.bits_stored,
        transfer_syntax=im.transfer_syntax, performed_procedure_description=s.procedure,
        patient_orientation_meaning=ORIENTATION[im.view], view_code_meaning=VIEW_CODE[im.view],
        series_number=n + 1, instance_number=1)


def build_patient(p: PatientTruth, root: Path, jpg_root: Path | None, seed: int) -> PatientResult:
    """Render, encode and write one patient's studies; returns the filled-in truth and report texts."""
    reports, impressions, statements = {}, {}, {}
    prior: StudyTruth | None = None
    for s in p.studies:
        rng = np.random.default_rng([seed, 31, s.study_id])
        rep = write_report(s, prior, p.anatomy, rng)
        s.labels = rep.labels
        reports[s.study_id] = rep.text
        concl = rep.sections.get(rep.label_section or "", [])
        impressions[s.study_id] = " ".join(st.text for st in concl)
        statements[s.study_id] = [
            {"section": name, "text": st.text, "kinds": list(st.kinds),
             "mentions": [{"observation": m.observation, "certainty": m.certainty} for m in st.mentions]}
            for name, sts in rep.sections.items() for st in sts]
        sdir = root / study_dir(p.subject_id, s.study_id)
        sdir.mkdir(parents=True, exist_ok=True)
        _write_report_file(sdir.with_suffix(".txt"), rep.text, s.report_defect)
        for n, im in enumerate(s.images):
            out = render_image(p.anatomy, s.findings, s.ctr, im.view, im.pose, im.rows, im.columns)
            im.regions = list(out.regions)
            im.landmarks = dict(out.landmarks)
            path = sdir / f"{im.dicom_id}.dcm"
            irng = np.random.default_rng([seed, 37, s.study_id, n])
            if im.defect == "missing_image":
                continue
            if im.defect == "corrupt_dicom":
                path.write_bytes(b"\x00" * 64 + irng.integers(0, 256, size=4096, dtype=np.uint8).tobytes())
                continue
            dicom.write_dicom(path, out.image, _spec(p, s, im, n, irng))
            if im.defect == "truncated_dicom":
                data = path.read_bytes()
                path.write_bytes(data[: int(len(data) * 0.6)])
                continue
            if jpg_root is not None:
                jpath = jpg_root / image_path(p.subject_id, s.study_id, im.dicom_id, "jpg")
                jpath.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(dicom.official_jpg_recipe(path)).save(jpath, quality=95)
        prior = s
    return PatientResult(p, reports, impressions, statements)


def _write_report_file(path: Path, text: str, defect: str | None) -> None:
    if defect == "missing_report":
        return
    if defect == "empty_report":
        path.write_bytes(b"")
    elif defect == "report_not_utf8":
        # A Latin-1 byte (as older exports sometimes carry) makes the file invalid UTF-8.
        path.write_bytes(text.replace("___", "\xe9___", 1).encode("latin-1"))
    else:
        path.write_text(text, encoding="ascii", newline="\n")


def _label_row_written(s: StudyTruth) -> bool:
    """The labeler ran on every report it could read; missing or empty ones have no chexpert row."""
    return s.report_defect not in ("missing_report", "empty_report")


def generate(params: FixtureParams, seed: int, root: str | Path, jpg_root: str | Path | None, extras: str | Path,
             workers: int = 0) -> dict:
    """Sample, render and write the whole dataset; returns the metrics dict."""
    root, extras = Path(root), Path(extras)
    jpg = Path(jpg_root) if jpg_root is not None else None
    _clear_previous_phantom([root, extras] + ([jpg] if jpg is not None else []), extras)
    for d in (root, extras, jpg):
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
    if not params.write_jpg:
        jpg = None
    patients = sample_dataset(params, seed)
    args = [(p, root, jpg, seed) for p in patients]
    if workers > 0:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            results = list(tqdm(ex.map(_build, args, chunksize=4), total=len(args), desc="phantom", unit="patient"))
    else:
        results = [_build(a) for a in tqdm(args, desc="phantom", unit="patient")]
    patients = [r.patient for r in results]
    reports = {k: v for r in results for k, v in r.reports.items()}
    impressions = {k: v for r in results for k, v in r.impressions.items()}
    _write_tables(patients, root, jpg, reports, params)
    for base in [root] + ([jpg] if jpg is not None else []):  # last: it lists every file written under the root
        write_checksums(base)
    statements = {k: v for r in results for k, v in r.statements.items()}
    write_jsonl(extras / TRUTH_FILE, ground_truth_records(patients, statements))
    sheet = contact_sheet(root, patients, impressions, params.contact_sheet_images)
    sheet.save(extras / "contact_sheet.png", optimize=False)
    return dataset_metrics(patients)


def _clear_previous_phantom(dirs: list[Path], extras: Path) -> None:
    """Remove an earlier phantom; refuse to touch a non-empty folder that is not one (it may be real data)."""
    ours = (extras / TRUTH_FILE).is_file()
    for d in dirs:
        if d.exists() and any(d.iterdir()):
            if not ours:
                raise FileExistsError(f"{d}: not empty and not a phantom written by cxrsynth; refusing to overwrite")
            shutil.rmtree(d)


def _build(a: tuple) -> PatientResult:
    return build_patient(*a)


def _write_tables(patients: list[PatientTruth], root: Path, jpg: Path | None, reports: dict[int, str],
                  params: FixtureParams) -> None:
    studies = [(p, s) for p in patients for s in p.studies]
    images = [(p, s, im) for p, s in studies for im in s.images]
    rec = [(p.subject_id, s.study_id, im.dicom_id, image_path(p.subject_id, s.study_id, im.dicom_id))
           for p, s, im in images]
    stu = [(p.subject_id, s.study_id, report_path(p.subject_id, s.study_id)) for p, s in studies]
    meta = [(im.dicom_id, p.subject_id, s.study_id, s.procedure, im.view, im.rows, im.columns, int(s.study_date),
             s.study_time, s.procedure, VIEW_CODE[im.view], ORIENTATION[im.view]) for p, s, im in images]
    split = [(im.dicom_id, s.study_id, p.subject_id, p.split) for p, s, im in images]
    labels = [(p.subject_id, s.study_id, *[s.labels[o] for o in OBSERVATIONS]) for p, s in studies
              if _label_row_written(s)]
    write_csv(root / CSV_NAMES["records"], RECORD_HEADER, rec)
    write_csv(root / CSV_NAMES["studies"], STUDY_HEADER, stu)
    for base in [root] + ([jpg] if jpg is not None else []):
        write_csv(base / CSV_NAMES["metadata"], METADATA_HEADER, meta)
        write_csv(base / CSV_NAMES["split"], SPLIT_HEADER, split)
        write_csv(base / CSV_NAMES["chexpert"], LABEL_HEADER, labels)
        write_csv(base / CSV_NAMES["negbio"], LABEL_HEADER, labels)
    if params.write_reports_zip:
        members = []
        for p, s in studies:
            f = root / report_path(p.subject_id, s.study_id)
            if f.exists():
                members.append((report_path(p.subject_id, s.study_id), f.read_bytes()))
        write_zip(root / REPORTS_ZIP, members)
    if jpg is not None:
        names = [image_path(p.subject_id, s.study_id, im.dicom_id, "jpg") for p, s, im in images
                 if (jpg / image_path(p.subject_id, s.study_id, im.dicom_id, "jpg")).exists()]
        (jpg / JPG_LIST).write_text("".join(n + "\n" for n in names), encoding="ascii")


def ground_truth_records(patients: list[PatientTruth], statements: dict[int, list[dict]]) -> list[dict]:
    """One JSON record per image: identifiers, encoding, defects, findings with anatomy and region, labels."""
    out = []
    for p in patients:
        for s in p.studies:
            for im in s.images:
                regions = {r.kind: r for r in im.regions}
                findings = []
                for i, f in enumerate(s.findings):
                    reg = im.regions[i] if i < len(im.regions) else regions.get(f.kind)
                    findings.append({
                        "kind": f.kind, "pathology": f.observation, "anatomy": finding_anatomy(f), "side": f.side,
                        "severity": f.severity, "location": f.location, "report": f.report, "change": f.change,
                        "region": None if reg is None else {"box": list(reg.box),
                                                            "mask_rle": None if reg.mask_rle is None
                                                            else list(reg.mask_rle)}})
                out.append({
                    "dicom_id": im.dicom_id, "subject_id": p.subject_id, "study_id": s.study_id, "split": p.split,
                    "path": image_path(p.subject_id, s.study_id, im.dicom_id),
                    "report_path": report_path(p.subject_id, s.study_id),
                    "view": im.view, "rows": im.rows, "columns": im.columns, "modality": im.modality,
                    "photometric": im.photometric, "bits_stored": im.bits_stored,
                    "transfer_syntax": im.transfer_syntax, "defect": im.defect, "report_defect": s.report_defect,
                    "report_style": s.report_style, "prior_study_id": s.prior_study_id,
                    "archetype": p.archetype, "anatomy": asdict(p.anatomy), "pose": asdict(im.pose),
                    "ctr": s.ctr, "findings": findings, "hedges": list(s.hedges), "labels": s.labels,
                    "label_row": _label_row_written(s), "landmarks": im.landmarks,
                    "report_statements": statements.get(s.study_id, []),
                    "planted_identifiers": {"patient_name": p.patient_name, "patient_id": p.patient_id},
                })
    return out


def dataset_metrics(patients: list[PatientTruth]) -> dict:
    """Counts for metrics/fixture.json: sizes, views, splits, label prevalence, findings, defects, encodings."""
    studies = [s for p in patients for s in p.studies]
    images = [im for s in studies for im in s.images]
    labelled = [s for s in studies if _label_row_written(s)]
    prevalence = {o: round(sum(1 for s in labelled if s.labels.get(o) == 1.0) / max(1, len(labelled)), 4)
                  for o in OBSERVATIONS}
    uncertain = {o: sum(1 for s in labelled if s.labels.get(o) == -1.0) for o in OBSERVATIONS}
    return {
        "patients": len(patients), "studies": len(studies), "images": len(images),
        "images_by_view": dict(sorted(Counter(im.view for im in images).items())),
        "patients_by_split": dict(sorted(Counter(p.split for p in patients).items())),
        "images_by_split": dict(sorted(Counter(p.split for p in patients for s in p.studies
                                               for _ in s.images).items())),
        "label_prevalence": prevalence, "label_uncertain_counts": uncertain,
        "finding_counts": dict(sorted(Counter(f.kind for s in studies for f in s.findings).items())),
        "normal_studies": sum(1 for s in studies if not s.findings),
        "image_defects": dict(sorted(Counter(im.defect for im in images if im.defect).items())),
        "report_defects": dict(sorted(Counter(s.report_defect for s in studies if s.report_defect).items())),
        "photometric": dict(sorted(Counter(im.photometric for im in images).items())),
        "transfer_syntax": dict(sorted(Counter(im.transfer_syntax for im in images).items())),
        "modality": dict(sorted(Counter(im.modality for im in images).items())),
        "report_styles": dict(sorted(Counter(s.report_style for s in studies).items())),
    }
