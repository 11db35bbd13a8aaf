"""Stage `prompts`: the anatomy-pathology prompting module.

Reads params.yaml (base.seed, paths.interim, paths.phantom, paths.prompts, prompts.*), the ingest manifest and, when
present, the phantom's ground-truth sidecar. Writes paths.prompts/{vocab.json, findings.parquet, prompts.parquet}
and metrics/prompts.json.

The work: findings for every ingested report, the mined vocabulary, written prompts, and the measured quality of
all three (`run` returns the metrics, flat keys for `dvc metrics diff`).
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from cxrsynth.stages import check_outputs
from cxrsynth.config import PromptsParams, stage_params
from cxrsynth.data.phantom.truth import TRUTH_FILE, iter_truth
from cxrsynth.io import write_json
from cxrsynth.text.chexpert import OBSERVATIONS, Mention, aggregate
from cxrsynth.text.findings import Finding, extract_findings
from cxrsynth.text.labels import chexpert_labels, chexpert_mentions
from cxrsynth.text.specs import PromptSpec, mine_vocabulary, round_trip, sample_spec, spec_from_findings
from cxrsynth.text.vocab import PATHOLOGIES
from cxrsynth.text.writers import diversity, make_writer


def main() -> None:
    params = stage_params()
    check_outputs(params, "prompts")
    sidecar = Path(params.paths.phantom) / TRUTH_FILE
    metrics = run(params.prompts, params.base.seed, Path(params.paths.interim) / "manifest.parquet",
                  Path(params.paths.prompts), sidecar if sidecar.is_file() else None)
    write_json(Path(params.paths.metrics) / "prompts.json", metrics)
    keys = ("prompts/round_trip_exact", "labels/macro_agreement", "extraction/present/macro_f1",
            "extraction/absent/macro_f1", "extraction/uncertain/macro_f1")
    print("prompts: " + ", ".join(f"{k}={metrics.get(k)}" for k in keys))



LABELS = [o for o in OBSERVATIONS]


def spec_labels(spec: PromptSpec) -> dict[str, float | None]:
    """CheXpert labels of what a prompt asks for (from its terms, whatever the writer wrote)."""
    mentions = [Mention(PATHOLOGIES[t.pathology].observation, t.certainty) for t in spec.terms
                if PATHOLOGIES[t.pathology].observation not in (None, "No Finding")]
    return aggregate(mentions)


def _finding_dict(f: Finding) -> dict:
    return {"pathology": f.pathology, "anatomy": f.anatomy, "certainty": f.certainty, "modifiers": f.modifiers,
            "span": list(f.span), "surface": f.surface}


STUDY_COLUMNS = ["subject_id", "study_id", "split", "report", "view", "dicom_id", *OBSERVATIONS]


def study_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per study: ids, split, report text, labels, and the view of its first frontal image."""
    return manifest.sort_values(["study_id", "dicom_id"]).drop_duplicates("study_id")[STUDY_COLUMNS].reset_index(
        drop=True)


def study_arrow(manifest_path: Path) -> pa.Table:
    """`study_table` of the manifest file, kept as an Arrow table (strings in one buffer, 4 bytes of offset each,
    not one Python object per report): the rows are turned into Python a batch at a time."""
    t = pq.read_table(manifest_path, columns=STUDY_COLUMNS)
    order = pc.sort_indices(t, sort_keys=[("study_id", "ascending"), ("dicom_id", "ascending")])
    sid = t.column("study_id").to_numpy()[order.to_numpy()]
    first = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]]) if len(sid) else np.zeros(0, np.int64)
    return t.take(pa.array(order.to_numpy()[first]))


def _label_code(v) -> int:
    """A CheXpert value as a small integer (1, 0, -1; 9 = blank)."""
    return 9 if v is None or (isinstance(v, float) and np.isnan(v)) else int(v)


def _f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def view_shares(manifest_path: Path) -> dict:
    """Share of each view among the training images (the sampled prompts' views follow it)."""
    m = pd.read_parquet(manifest_path, columns=["split", "view"])
    return m[m.split == "train"].view.value_counts(normalize=True).to_dict()


def extraction_vs_truth(studies: pa.Table, sidecar: Path) -> dict:
    """Statement-level extraction quality against the phantom writer's own record of what each sentence says:
    per observation and certainty precision / recall / F1, macro-F1 per certainty, and anatomy (side and lobe)
    accuracy for located findings. The sidecar is streamed (its first record of each study counts)."""
    ids = studies.column("study_id").to_numpy()
    position = {int(v): k for k, v in enumerate(ids)}
    done = np.zeros(len(ids), bool)
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    located = located_ok = 0
    for t in iter_truth(sidecar):
        k = position.get(int(t["study_id"]))
        if k is None or done[k]:
            continue
        done[k] = True
        for st in t["report_statements"]:
            if st["section"] not in ("findings", "impression", "last_paragraph", "full report"):
                continue
            # what a CheXpert-style labeler reads (implied absences such as "lungs are clear" are not mentions)
            got = {(m.observation, m.certainty) for m in chexpert_mentions(extract_findings(st["text"],
                                                                                            sections=None))}
            want = {(m["observation"], m["certainty"]) for m in st["mentions"]}
            for key in got | want:
                counts[key]["tp" if key in got and key in want else "fp" if key in got else "fn"] += 1
        report_findings = extract_findings(studies.column("report")[k].as_py() or "")
        for f in t["findings"]:
            if f["side"] not in ("left", "right") or f["kind"] not in (
                    "effusion", "pneumothorax", "consolidation", "pneumonia", "nodule", "mass"):
                continue
            located += 1
            same = [g for g in report_findings if g.observation == f["pathology"] and g.certainty != "absent"]
            lobe = f["location"] if f["kind"] in ("consolidation", "pneumonia", "nodule", "mass") else None
            located_ok += any((g.modifiers.get("side") == f["side"] or (g.anatomy or "").startswith(f["side"]))
                              and (lobe is None or lobe in (g.anatomy or "")) for g in same)
    out: dict[str, float] = {}
    for cert in ("present", "absent", "uncertain"):
        f1s = []
        for obs in OBSERVATIONS:
            c = counts.get((obs, cert))
            if not c or c["tp"] + c["fn"] == 0:
                continue
            p, r, f1 = _f1(c["tp"], c["fp"], c["fn"])
            out[f"extraction/{cert}/{obs}/precision"] = round(p, 4)
            out[f"extraction/{cert}/{obs}/recall"] = round(r, 4)
            out[f"extraction/{cert}/{obs}/f1"] = round(f1, 4)
            f1s.append(f1)
        out[f"extraction/{cert}/macro_f1"] = round(float(np.mean(f1s)), 4) if f1s else float("nan")
    out["extraction/anatomy_accuracy"] = round(located_ok / located, 4) if located else float("nan")
    out["extraction/located_findings"] = located
    return out


def label_agreement(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Our labeler vs the dataset's chexpert table (on MIMIC-CXR: the CheXpert labeler's output), from per-study
    label codes (N x 14 int8: 1 / 0 / -1, 9 = blank; `_label_code`)."""
    out: dict[str, float] = {}
    f1s, agrees = [], []
    for j, obs in enumerate(OBSERVATIONS):
        a, b = ours[:, j], theirs[:, j]
        agree = float((a == b).mean()) if len(a) else float("nan")
        _, _, f1 = _f1(int(((a == 1) & (b == 1)).sum()), int(((a == 1) & (b != 1)).sum()),
                       int(((a != 1) & (b == 1)).sum()))
        out[f"labels/{obs}/agreement"] = round(agree, 4)
        out[f"labels/{obs}/f1_positive"] = round(f1, 4)
        agrees.append(agree)
        if (b == 1).any():
            f1s.append(f1)
    out["labels/macro_agreement"] = round(float(np.mean(agrees)), 4)
    out["labels/macro_f1_positive"] = round(float(np.mean(f1s)), 4) if f1s else float("nan")
    return out


FINDINGS_CHUNK = 4096  # studies per row group of findings.parquet (and per batch of report text in Python)


def run(params: PromptsParams, seed: int, manifest_path: Path, out: Path, sidecar: Path | None) -> dict:
    """Stream the studies a batch at a time: findings.parquet is written as it goes and the vocabulary is mined
    from the same pass, so what stays in memory per study is 14 label bytes (and its id), plus the test split's
    findings (the paired prompts are written from them)."""
    out.mkdir(parents=True, exist_ok=True)
    studies = study_arrow(manifest_path)
    n = studies.num_rows
    counts = Counter()
    ours = np.full((n, len(OBSERVATIONS)), 9, np.int8)
    theirs = np.full((n, len(OBSERVATIONS)), 9, np.int8)
    test_rows: list = []
    test_fs: list[list[Finding]] = []
    schema = pa.schema([("subject_id", pa.int64()), ("study_id", pa.int64()), ("split", pa.string()),
                        ("n_findings", pa.int64()), ("findings", pa.string())])
    writer = pq.ParquetWriter(out / "findings.parquet", schema)
    bar = tqdm(total=n, desc="findings", unit="report")

    def walk():
        i = 0
        for batch in studies.to_batches(max_chunksize=FINDINGS_CHUNK):
            cols = {c: [] for c in schema.names}
            for r in batch.to_pylist():
                text = r["report"] or ""
                counts["reports"] += 1
                counts["empty_reports"] += not text.strip()
                counts["non_ascii_reports"] += not text.isascii()
                counts["long_reports"] += len(text) > params.long_report_chars
                fs = extract_findings(text)
                counts["reports_without_findings"] += not fs
                lab = chexpert_labels(text)
                ours[i] = [_label_code(lab[o]) for o in OBSERVATIONS]
                theirs[i] = [_label_code(r[o]) for o in OBSERVATIONS]
                for c, v in (("subject_id", r["subject_id"]), ("study_id", r["study_id"]), ("split", r["split"]),
                             ("n_findings", len(fs)), ("findings", json.dumps([_finding_dict(f) for f in fs]))):
                    cols[c].append(v)
                if r["split"] == "test":
                    test_rows.append(SimpleNamespace(**{k: r[k] for k in ("study_id", "dicom_id", "view", "report")}))
                    test_fs.append(fs)
                i += 1
                if r["split"] == "train":
                    yield fs
            writer.write_table(pa.table(cols, schema=schema))
            bar.update(batch.num_rows)

    try:
        vocab = mine_vocabulary(walk(), params.min_count)
    finally:
        writer.close()
        bar.close()
    (out / "vocab.json").write_text(vocab.to_json() + "\n", encoding="utf-8")

    prevalence = {p: sum(any(f.pathology == p and f.certainty != "absent" for f in fs) for fs in test_fs)
                  / max(1, len(test_fs)) for p in vocab.pathologies}
    prevalence[""] = sum(not any(f.certainty != "absent" for f in fs) for fs in test_fs) / max(1, len(test_fs))
    view_share = view_shares(manifest_path)
    prompt_writer = make_writer(params.writer, vocab, hf_model_path=params.hf_model_path, http_url=params.http_url,
                         http_model=params.http_model, http_api_key_env=params.http_api_key_env,
                         max_new_tokens=params.max_new_tokens, temperature=params.temperature)
    records = []
    for i in tqdm(range(params.n_sampled), desc="sampled prompts", unit="prompt"):
        rng = np.random.default_rng([seed, 41, i])
        spec = sample_spec(vocab, rng, params.label_mix, params.max_findings, params.max_negatives, view_share,
                           prevalence)
        records.append(_record(f"s{i:06d}", "sampled", spec, prompt_writer.write(spec, rng), seed, prompt_writer.name, None))
    if params.paired:
        for (r, fs) in zip(test_rows, test_fs):
            spec = spec_from_findings([f for f in fs if f.pathology in vocab.pathologies], r.view)
            rng = np.random.default_rng([seed, 43, int(r.study_id)])
            rec = _record(f"p{r.study_id}", "paired", spec, prompt_writer.write(spec, rng), seed, prompt_writer.name, r)
            records.append(rec)
    prompts = pd.DataFrame(records)
    prompts.to_parquet(out / "prompts.parquet", index=False)

    metrics: dict[str, float] = {f"counts/{k}": int(v) for k, v in sorted(counts.items())}
    metrics["vocab/pathologies"] = len(vocab.pathologies)
    metrics["vocab/anatomy"] = len(vocab.anatomy)
    metrics["vocab/cooccurrence_pairs"] = sum(len(v) for v in vocab.cooccurrence.values())
    metrics["prompts/sampled"] = int((prompts.kind == "sampled").sum()) if len(prompts) else 0
    metrics["prompts/paired"] = int((prompts.kind == "paired").sum()) if len(prompts) else 0
    if len(prompts):
        metrics["prompts/round_trip_exact"] = round(float(prompts.round_trip.mean()), 4)
        used = {t["pathology"] for terms in prompts.terms for t in json.loads(terms)}
        metrics["prompts/vocab_coverage"] = round(len(used & set(vocab.pathologies)) / max(1, len(vocab.pathologies)), 4)
        metrics |= {f"prompts/{k}": v for k, v in diversity(list(prompts.text)).items()}
    metrics |= label_agreement(ours, theirs)
    if sidecar is not None and sidecar.is_file():
        metrics |= extraction_vs_truth(studies, sidecar)
    return metrics


def _record(pid: str, kind: str, spec: PromptSpec, text: str, seed: int, writer: str, source) -> dict:
    labels = spec_labels(spec)
    rec = {"prompt_id": pid, "kind": kind, "text": text, "view": spec.view, "seed": seed, "writer": writer,
           "terms": json.dumps([t.to_dict() for t in spec.terms]), "round_trip": round_trip(text, spec),
           "source_study_id": None if source is None else int(source.study_id),
           "source_dicom_id": None if source is None else source.dicom_id,
           "source_report": None if source is None else source.report}
    rec |= {obs: labels[obs] for obs in OBSERVATIONS}
    return rec
