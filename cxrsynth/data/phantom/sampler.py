"""Sample the phantom's ground truth: patients, studies, images, findings, identifiers, dates, splits, defects.

Reads a FixtureParams and a seed; returns plain truth objects (truth.py) and touches no files. Prevalence and
co-occurrence come from patient archetypes (healthy outpatient, cardiac, infection, ICU, oncology, trauma) chosen
so that the label mix resembles MIMIC-CXR's (No Finding ~1/3, support devices, effusion, opacity and atelectasis
common, pneumothorax and fractures rare) and findings co-occur as they do clinically (effusion with atelectasis,
edema with cardiomegaly and effusions, ICU devices with AP portable films).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cxrsynth.config import FixtureParams
from cxrsynth.data.phantom.truth import Anatomy, Finding, ImageTruth, Pose, StudyTruth

ARCHETYPES: dict[str, float] = {
    "healthy": 0.30, "cardiac": 0.17, "infection": 0.14, "icu": 0.21, "oncology": 0.08, "trauma": 0.10,
}
# MIMIC's typical matrix sizes (rows, columns) before scaling.
MATRIX = {"PA": (3056, 2544), "AP": (2539, 2705), "LATERAL": (3056, 2544), "LL": (3056, 2544)}
VIEW_CODE = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}
ORIENTATION = {"PA": "Erect", "LATERAL": "Erect", "LL": "Erect", "AP": ""}
HEDGE_CANDIDATES = ("pneumonia", "atelectasis", "effusion", "edema", "consolidation", "nodule")
ACUTE = ("effusion", "pneumothorax", "consolidation", "pneumonia", "atelectasis", "edema")


@dataclass
class PatientTruth:
    subject_id: int
    archetype: str
    anatomy: Anatomy
    patient_name: str  # synthetic, planted in DICOM headers so leak checks have something to find
    patient_id: str
    birth_year: int
    split: str
    studies: list[StudyTruth]


def _pick(rng: np.random.Generator, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def _side(rng: np.random.Generator, p_bilateral: float = 0.0, p_right: float = 0.5) -> str:
    if rng.random() < p_bilateral:
        return "bilateral"
    return "right" if rng.random() < p_right else "left"


def _lobe(rng: np.random.Generator, side: str) -> str:
    if side == "right":
        return _pick(rng, ("upper", "middle", "lower"), p=(0.25, 0.2, 0.55))
    return _pick(rng, ("upper", "lingula", "lower"), p=(0.25, 0.15, 0.6))


def _make_finding(rng: np.random.Generator, kind: str) -> Finding:
    """One finding of a kind with plausible side / severity / location."""
    if kind == "cardiomegaly":
        return Finding(kind, None, _pick(rng, ("mild", "moderate", "severe"), p=(0.45, 0.4, 0.15)))
    if kind == "enlarged_cardiomediastinum":
        return Finding(kind, None, _pick(rng, ("mild", "moderate")))
    if kind == "effusion":
        return Finding(kind, _side(rng, 0.4, 0.55), _pick(rng, ("small", "moderate", "large"), p=(0.5, 0.35, 0.15)))
    if kind == "pneumothorax":
        return Finding(kind, _side(rng), _pick(rng, ("small", "moderate", "large"), p=(0.55, 0.3, 0.15)))
    if kind in ("consolidation", "pneumonia"):
        side = _side(rng, 0.0, 0.55)
        return Finding(kind, side, _pick(rng, ("mild", "moderate", "severe"), p=(0.35, 0.45, 0.2)), _lobe(rng, side))
    if kind == "atelectasis":
        side = _side(rng, 0.35, 0.45)
        loc = "base" if side == "bilateral" or rng.random() < 0.8 else "lobar"
        return Finding(kind, side, _pick(rng, ("mild", "moderate")), loc)
    if kind == "edema":
        return Finding(kind, "bilateral", _pick(rng, ("mild", "moderate", "severe"), p=(0.45, 0.4, 0.15)))
    if kind == "nodule":
        side = _side(rng)
        return Finding(kind, side, "small", _lobe(rng, side))
    if kind == "mass":
        side = _side(rng)
        return Finding(kind, side, "large", _lobe(rng, side))
    if kind == "rib_fracture":
        return Finding(kind, _side(rng), "mild", str(int(rng.integers(4, 10))))
    if kind == "pleural_thickening":
        return Finding(kind, _side(rng, 0.2), "mild", _pick(rng, ("apical", "lateral")))
    if kind == "pacemaker":
        return Finding(kind, "left" if rng.random() < 0.85 else "right", "moderate")
    if kind in ("central_line", "picc"):
        return Finding(kind, _side(rng, 0.0, 0.6), "moderate")
    return Finding(kind, None, "moderate")  # et_tube, ng_tube


# Per archetype: (kind, probability) drawn independently, then coupled below.
_ARCHETYPE_FINDINGS: dict[str, tuple[tuple[str, float], ...]] = {
    "healthy": (("nodule", 0.03), ("rib_fracture", 0.02), ("pleural_thickening", 0.03), ("atelectasis", 0.05)),
    "cardiac": (("cardiomegaly", 0.85), ("edema", 0.45), ("effusion", 0.5), ("pacemaker", 0.25),
                ("enlarged_cardiomediastinum", 0.08), ("central_line", 0.05)),
    "infection": (("pneumonia", 0.55), ("consolidation", 0.3), ("effusion", 0.2), ("atelectasis", 0.15),
                  ("picc", 0.08)),
    "icu": (("et_tube", 0.55), ("ng_tube", 0.45), ("central_line", 0.45), ("picc", 0.15), ("atelectasis", 0.5),
            ("effusion", 0.45), ("edema", 0.22), ("cardiomegaly", 0.2), ("consolidation", 0.15),
            ("pneumothorax", 0.10), ("pacemaker", 0.05)),
    "oncology": (("mass", 0.4), ("nodule", 0.35), ("effusion", 0.35), ("central_line", 0.35),
                 ("pleural_thickening", 0.1), ("enlarged_cardiomediastinum", 0.1), ("atelectasis", 0.15)),
    "trauma": (("rib_fracture", 0.6), ("pneumothorax", 0.45), ("effusion", 0.2), ("atelectasis", 0.2),
               ("enlarged_cardiomediastinum", 0.1), ("et_tube", 0.15)),
}


def sample_findings(rng: np.random.Generator, archetype: str) -> list[Finding]:
    """A coherent set of findings for one study of a patient of this archetype."""
    kinds = [k for k, p in _ARCHETYPE_FINDINGS[archetype] if rng.random() < p]
    # Clinical coupling: edema comes with cardiomegaly often; effusions bring basal atelectasis; one lesion type.
    if "edema" in kinds and "cardiomegaly" not in kinds and rng.random() < 0.5:
        kinds.append("cardiomegaly")
    if "effusion" in kinds and "atelectasis" not in kinds and rng.random() < 0.35:
        kinds.append("atelectasis")
    if "mass" in kinds and "nodule" in kinds:
        kinds.remove("nodule")
    if "pneumonia" in kinds and "consolidation" in kinds:
        kinds.remove("consolidation")
    if "ng_tube" in kinds and "et_tube" not in kinds and rng.random() < 0.6:
        kinds.append("et_tube")
    findings = [_make_finding(rng, k) for k in dict.fromkeys(kinds)]
    # Effusion-associated atelectasis sits at the same base.
    eff = next((f for f in findings if f.kind == "effusion"), None)
    findings = [replace(f, side=eff.side, location="base") if (f.kind == "atelectasis" and eff) else f
                for f in findings]
    return [_hedge(rng, f) for f in findings]


def _hedge(rng: np.random.Generator, f: Finding) -> Finding:
    """Radiologists hedge subtle findings; devices and fractures are stated plainly."""
    p = {"pneumonia": 0.35, "consolidation": 0.1, "atelectasis": 0.2, "edema": 0.15, "effusion": 0.08,
         "nodule": 0.2, "pneumothorax": 0.05}.get(f.kind, 0.0)
    if f.severity in ("mild", "small") and rng.random() < p * 1.5:
        return replace(f, report="uncertain")
    return f


def evolve_findings(rng: np.random.Generator, prior: list[Finding], archetype: str) -> list[Finding]:
    """Follow-up study: chronic findings persist, acute ones resolve, persist or change, new ones may appear."""
    out: list[Finding] = []
    for f in prior:
        if f.kind in ACUTE:
            r = rng.random()
            if r < 0.3:
                continue  # resolved
            if r < 0.65:
                out.append(replace(f, change="unchanged"))
            else:
                sev = _shift_severity(rng, f.kind, f.severity)
                change = "unchanged" if sev == f.severity else (
                    "increased" if _rank(sev) > _rank(f.severity) else "decreased")
                out.append(replace(f, severity=sev, change=change))
        elif f.kind in ("et_tube", "ng_tube") and rng.random() < 0.35:
            continue  # extubated / tube removed
        else:
            out.append(replace(f, change="unchanged", report="present"))
    present = {f.kind for f in out}
    for f in sample_findings(rng, archetype):
        if f.kind not in present and (f.kind in ACUTE or f.kind in ("et_tube", "ng_tube", "central_line", "picc")):
            if rng.random() < 0.4:
                out.append(replace(f, change="new"))
    return out


_ORDER = {"mild": 0, "small": 0, "moderate": 1, "severe": 2, "large": 2}


def _rank(sev: str) -> int:
    return _ORDER[sev]


def _shift_severity(rng: np.random.Generator, kind: str, sev: str) -> str:
    """One step up or down the kind's own severity scale."""
    scale = ("small", "moderate", "large") if kind in ("effusion", "pneumothorax") else ("mild", "moderate", "severe")
    i = min(2, max(0, scale.index(sev) + int(rng.choice([-1, 1]))))
    return scale[i]


def sample_ctr(rng: np.random.Generator, anatomy: Anatomy, findings: list[Finding]) -> float:
    """Cardiothoracic ratio drawn on frontal views: > 0.5 exactly when cardiomegaly is among the findings."""
    cm = next((f for f in findings if f.kind == "cardiomegaly"), None)
    if cm is None:
        return anatomy.ctr
    lo, hi = {"mild": (0.53, 0.57), "moderate": (0.57, 0.63), "severe": (0.63, 0.70)}[cm.severity]
    return round(float(rng.uniform(lo, hi)), 4)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    sex = "F" if rng.random() < 0.48 else "M"
    return Anatomy(
        sex=sex,
        age=int(rng.integers(18, 92)),
        thorax_width=round(float(rng.uniform(0.62, 0.78)), 4),
        lung_height=round(float(rng.uniform(0.50, 0.64)), 4),
        ctr=round(float(rng.uniform(0.38, 0.48)), 4),
        mediastinum_width=round(float(rng.uniform(0.22, 0.30)), 4),
        soft_tissue=round(float(rng.uniform(0.0, 1.0)), 4),
    )


def sample_pose(rng: np.random.Generator, view: str) -> Pose:
    ap = view == "AP"
    return Pose(
        rotation=round(float(rng.uniform(-4, 4)), 3),
        shift_x=round(float(rng.uniform(-0.035, 0.035)), 4),
        shift_y=round(float(rng.uniform(-0.03, 0.03)), 4),
        inspiration=round(float(rng.uniform(8.0, 9.5) if ap else rng.uniform(9.0, 11.0)), 3),
        exposure=round(float(rng.uniform(0.8, 1.2)), 3),
        noise=round(float(rng.uniform(0.006, 0.03 if ap else 0.02)), 4),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


_SYLLABLES = ("zor", "vex", "qui", "lom", "tra", "bex", "nyx", "pol", "dru", "kav", "mex", "sul", "yor", "fip")


def phantom_name(rng: np.random.Generator) -> str:
    """A name nobody has: 'PHANTOM^' + nonsense syllables, so a leak scan can find it unambiguously."""
    given = "".join(_pick(rng, _SYLLABLES) for _ in range(3)).upper()
    return f"PHANTOM^{given}"


def dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, size=5, dtype=np.uint64))


def study_time(rng: np.random.Generator) -> float:
    """HHMMSS.fff written as a float, as MIMIC's metadata does (leading zeros lost)."""
    h, m, s = int(rng.integers(0, 24)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    ms = int(rng.integers(0, 1000))
    return float(f"{h:02d}{m:02d}{s:02d}.{ms:03d}")


def _views_for(rng: np.random.Generator, archetype: str, params: FixtureParams) -> tuple[str, list[str]]:
    portable = {"icu": 0.95, "trauma": 0.6, "cardiac": 0.3, "infection": 0.35, "oncology": 0.15,
                "healthy": 0.05}[archetype]
    if rng.random() < portable:
        views = ["AP"] + (["AP"] if rng.random() < 0.08 else [])
        return "CHEST (PORTABLE AP)", views
    if rng.random() < params.lateral_fraction:
        return "CHEST (PA AND LAT)", ["PA", "LL" if rng.random() < 0.05 else "LATERAL"]
    return "CHEST (PA AND LAT)" if rng.random() < 0.3 else "CHEST (PA)", ["PA"]


def _image(rng: np.random.Generator, view: str, params: FixtureParams, used_ids: set[str]) -> ImageTruth:
    base_r, base_c = MATRIX[view]
    jitter = rng.uniform(0.88, 1.12, size=2)
    rows = int(round(base_r * params.image_scale * jitter[0] / 2)) * 2
    cols = int(round(base_c * params.image_scale * jitter[1] / 2)) * 2
    if rows == cols:
        cols += 2
    modality = "CR" if rng.random() < params.cr_fraction else "DX"
    photometric = "MONOCHROME1" if rng.random() < params.monochrome1_fraction else "MONOCHROME2"
    bits = int(_pick(rng, (10, 12, 14, 15), p=(0.1, 0.6, 0.15, 0.15)))
    r = rng.random()
    if r < params.jpeg2000_fraction:
        ts = "jpeg2000_lossless" if rng.random() < 0.6 else "jpeg2000"
    elif r < params.jpeg2000_fraction + params.rle_fraction:
        ts = "rle"
    else:
        ts = "explicit_le"
    did = dicom_id(rng)
    while did in used_ids:
        did = dicom_id(rng)
    used_ids.add(did)
    return ImageTruth(dicom_id=did, view=view, rows=rows, columns=cols, modality=modality, photometric=photometric,
                      bits_stored=bits, transfer_syntax=ts, pose=sample_pose(rng, view))


_STYLES = ("standard", "legacy", "wet_read", "addendum", "no_findings", "no_impression", "headerless", "typo")
_STYLE_P = (0.62, 0.12, 0.04, 0.03, 0.08, 0.05, 0.03, 0.03)


def sample_dataset(params: FixtureParams, seed: int) -> list[PatientTruth]:
    """All patients with their studies and images; deterministic in (params, seed)."""
    rng = np.random.default_rng([seed, 20403])
    n = params.patients
    subject_ids = sorted(int(v) for v in rng.choice(9_999_999, size=n, replace=False) + 10_000_000)
    study_pool = rng.choice(9_999_999, size=n * params.max_studies_per_patient, replace=False) + 50_000_000
    order = rng.permutation(n)
    n_test = int(round(n * params.test_fraction))
    n_val = int(round(n * params.validate_fraction))
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[int(idx)] = "test" if rank < n_test else "validate" if rank < n_test + n_val else "train"
    names = list(ARCHETYPES)
    probs = np.array(list(ARCHETYPES.values()))
    probs = probs / probs.sum()
    used_ids: set[str] = set()
    patients: list[PatientTruth] = []
    next_study = 0
    for i, sid in enumerate(subject_ids):
        prng = np.random.default_rng([seed, 20403, sid])
        archetype = names[int(prng.choice(len(names), p=probs))]
        anatomy = sample_anatomy(prng)
        n_studies = 1 + min(params.max_studies_per_patient - 1, int(prng.geometric(0.55)) - 1)
        day = int(prng.integers(0, 365 * 80))  # shifted dates land in 2110..2190, consistent per patient
        base = np.datetime64("2110-01-01") + np.timedelta64(day, "D")
        studies: list[StudyTruth] = []
        findings: list[Finding] = []
        for j in range(n_studies):
            if j == 0:
                findings = sample_findings(prng, archetype)
            else:
                base = base + np.timedelta64(int(prng.integers(1, 400)), "D")
                findings = evolve_findings(prng, findings, archetype)
            hedges = [k for k in HEDGE_CANDIDATES if k not in {f.kind for f in findings} and prng.random() < 0.03]
            procedure, views = _views_for(prng, archetype, params)
            images = [_image(prng, v, params, used_ids) for v in views]
            study = StudyTruth(
                subject_id=sid, study_id=int(study_pool[next_study]),
                study_date=str(base).replace("-", ""), study_time=study_time(prng), procedure=procedure,
                findings=findings, hedges=hedges, ctr=sample_ctr(prng, anatomy, findings), images=images,
                prior_study_id=studies[-1].study_id if studies else None,
                report_style=_pick(prng, _STYLES, p=_STYLE_P))
            next_study += 1
            studies.append(study)
        patients.append(PatientTruth(
            subject_id=sid, archetype=archetype, anatomy=anatomy, patient_name=phantom_name(prng),
            patient_id=f"PHN{int(prng.integers(0, 10**7)):07d}", birth_year=2110 - anatomy.age + int(day / 365),
            split=split_of[i], studies=studies))
    _assign_defects(rng, patients, params)
    return patients


def _assign_defects(rng: np.random.Generator, patients: list[PatientTruth], params: FixtureParams) -> None:
    """Plant bad inputs: at least one of each kind when the fraction is non-zero, so tests always see them."""
    from cxrsynth.data.phantom.truth import IMAGE_DEFECTS, REPORT_DEFECTS

    studies = [s for p in patients for s in p.studies]
    images = [im for s in studies for im in s.images]
    if params.image_defect_fraction > 0 and images:
        k = min(len(images), max(len(IMAGE_DEFECTS), int(round(params.image_defect_fraction * len(images)))))
        for n, idx in enumerate(sorted(rng.choice(len(images), size=k, replace=False))):
            images[int(idx)].defect = IMAGE_DEFECTS[n % len(IMAGE_DEFECTS)]
    if params.report_defect_fraction > 0 and studies:
        k = min(len(studies), max(len(REPORT_DEFECTS), int(round(params.report_defect_fraction * len(studies)))))
        for n, idx in enumerate(sorted(rng.choice(len(studies), size=k, replace=False))):
            studies[int(idx)].report_defect = REPORT_DEFECTS[n % len(REPORT_DEFECTS)]
