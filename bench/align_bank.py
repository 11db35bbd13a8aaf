"""Key-patch bank rules compared by patient-level 2-fold cross-validation on the phantom (more cases than the stage's
held-out pointing game, so rules and models can be told apart from noise).

    python -m bench.align_bank                         # models/align: every rule in BANK_RULES, then the stage's
                                                       # rule in the other shift space, with bank.adjust
                                                       # flipped, with view strata flipped, without mirror pooling,
                                                       # and the previous release's rule (patches, none of them)
    python -m bench.align_bank models/align shift,text # another trained align folder, chosen rules

For each fold the bank is built (`build_bank`, the stage's `align.bank` per_key, min_support, strata and mirror unless a line says
otherwise) from the training images of half the patients, and the pointing game (k = align.pointing_k) runs on the
training images of the other half plus validate and test. The alignment model itself saw all training images, for
every rule alike, so the comparison between rules is fair; the absolute numbers are not the stage's held-out ones.
Needs the phantom ground truth (`<phantom>/ground_truth.jsonl`) and the stage outputs of ingest, tokens and align.
Writes nothing; prints one line per variant: bank pointing / area share per finding, with the number of cases.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth.config import stage_params
from cxrsynth.models.align import AlignModel
from cxrsynth.models.align_training import Pairs
from cxrsynth.keypatches import BANK_RULES, build_bank
from cxrsynth.eval.alignment import pointing_cases, pointing_metrics
from cxrsynth.models.vqgan import weights_sha256
from cxrsynth.data.phantom.truth import TRUTH_FILE, truth_by_image
from cxrsynth.stages.align import split_pairs

FINDINGS = ("pleural effusion", "pneumothorax", "cardiomegaly", "consolidation", "lung lesion", "atelectasis",
            "pulmonary edema")


def _subset(pairs: Pairs, idx: np.ndarray) -> Pairs:
    return Pairs([pairs.texts[i] for i in idx], pairs.grids[idx], pairs.groups[idx])


def main(argv: list[str]) -> None:
    params = stage_params()
    p, paths = params.align, params.paths
    folder = Path(argv[0]) if argv else Path(paths.models) / "align"
    rules = argv[1].split(",") if len(argv) > 1 else list(BANK_RULES)
    b = p.bank
    other = "patches" if b.space == "codes" else "codes"
    flip = {"view": "none", "none": "view"}
    variants = [replace(b, rule=rule) for rule in rules]
    if len(argv) <= 1:  # what the space, adjustment, view strata and mirror pooling each add, under the stage's rule
        variants += [replace(b, space=other), replace(b, adjust=not b.adjust), replace(b, strata=flip[b.strata]),
                     replace(b, mirror=False), replace(b, space="patches", strata="none", mirror=False, adjust=False)]
    model = AlignModel.load(folder)
    sha = weights_sha256(Path(paths.models) / "vqgan")
    manifest = pd.read_parquet(Path(paths.interim) / "manifest.parquet")
    data = {s: split_pairs(manifest, Path(paths.tokens), s, sha) for s in ("train", "validate", "test")
            if (manifest.split == s).any()}
    sidecar = Path(paths.phantom) / TRUTH_FILE
    if not sidecar.is_file():
        raise SystemExit(f"{sidecar}: no phantom ground truth, nothing to point at")
    truth = truth_by_image(sidecar)
    train, rows = data["train"]
    fold = rows.subject_id.to_numpy().astype(np.int64) % 2  # by patient: no patient on both sides
    held = [(data[s][0], [truth.get(d) for d in data[s][1].dicom_id]) for s in ("validate", "test") if s in data]
    print(f"{folder}: {len(train.texts)} training images, folds {np.bincount(fold).tolist()}, k={p.pointing_k}")
    print("rule  space   strata mirror adjust " + " ".join(f"{f[:12]:>16s}" for f in FINDINGS))
    views = rows.view.to_numpy()
    for v in variants:
        cases = []
        for f in (0, 1):
            build, other = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
            bank_pairs = _subset(train, build)
            model.bank = build_bank(model, bank_pairs.texts, bank_pairs.grids, v, strata=views[build])
            evals = [(_subset(train, other), [truth.get(d) for d in rows.dicom_id.to_numpy()[other]]), *held]
            for pairs, tru in evals:
                cases += pointing_cases(model, pairs, tru, k=p.pointing_k, image_size=params.ingest.image_size,
                                        resize=params.ingest.resize)
        m = pointing_metrics(cases, p.pointing_k, seed=params.base.seed)
        cells = []
        for f in FINDINGS:
            r, n = m.get(f"pointing/ratio_bank/{f}"), m.get(f"pointing/n_with_bank/{f}")
            cells.append(f"{'-' if r is None else f'{r:.2f}':>8s} (n={n or 0:3d})")
        print(f"{v.rule:5s} {v.space:7s} {v.strata:6s} {'yes' if v.mirror else 'no':6s} "
              f"{'yes' if v.adjust else 'no':6s} " + " ".join(cells),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
