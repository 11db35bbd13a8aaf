"""Geometry read off a frontal chest radiograph itself (no ground truth): lung fields and cardiothoracic ratio.

The measurement mimics how a reader takes the cardiothoracic ratio: find the two lung fields (dark regions enclosed by
brighter tissue), take the widest transverse extent of the heart between them (the sum of its furthest reaches to
either side, measured above each hemidiaphragm) and divide by the widest internal thoracic width (the lateral lung
margins) near the level of the domes. It works on display images (air dark), any size from about 64 pixels up,
and tolerates noise, a few degrees of rotation and contrast changes.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from cxrsynth.io import json_number
from cxrsynth.keypatches import terms_from_json

__all__ = ["LungFields", "find_lungs", "lung_side_means", "measure_cardiothoracic", "measure_ctr"]

_WORK = 256  # working resolution (pixels per side); widths are ratios, so the aspect change is harmless


class LungFields:
    """The two lung masks on the working grid, image-left one first (the patient's right on a PA view)."""

    def __init__(self, image: np.ndarray, left: np.ndarray, right: np.ndarray, scale: tuple[float, float]):
        self.image, self.left, self.right, self.scale = image, left, right, scale


def _prepare(image: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Grey float image resized to the working grid, smoothed and normalised to robust [0, 1]."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = img.mean(axis=-1)
    if img.ndim != 2 or min(img.shape) < 16:
        raise ValueError(f"expected a 2-D image of at least 16x16, got shape {np.shape(image)}")
    zy, zx = _WORK / img.shape[0], _WORK / img.shape[1]
    work = ndimage.zoom(img, (zy, zx), order=1, grid_mode=True, mode="nearest")
    # small inputs are upsampled: smooth in proportion so their pixel noise does not fragment the lungs
    work = ndimage.gaussian_filter(work, (max(1.6, 0.7 * zy), max(1.6, 0.7 * zx)))
    lo, hi = np.percentile(work, [1, 99.5])
    work = np.clip((work - lo) / max(hi - lo, 1e-6), 0, 1)
    return work, (zy, zx)


def _tidy(mask: np.ndarray) -> np.ndarray:
    """Lung mask without holes (vessels, nodules) and with a smoothed outline."""
    # closing with a small disk fills the bays that bright hilar vessels and rib crossings bite into the margin
    yy, xx = np.mgrid[-4:5, -4:5]
    disk = yy * yy + xx * xx <= 16
    mask = ndimage.binary_closing(np.pad(mask, 5), structure=disk)[5:-5, 5:-5]
    return ndimage.binary_fill_holes(mask)


def find_lungs(image: np.ndarray) -> LungFields:
    """Segment the two lung fields of a frontal display image (dark, enclosed, one on each side of the midline)."""
    work, scale = _prepare(image)
    n = work.shape[0]
    c0, c1 = int(0.1 * n), int(0.9 * n)
    inner = work[c0:c1, c0:c1]
    # grey levels of aerated lung and of soft tissue, ignoring the air outside the body
    body = inner[inner > 0.08]
    if body.size < 0.05 * inner.size:
        raise ValueError("no body in the image")
    lung_lv, tissue_lv = np.percentile(body, [5, 85])
    # the air around the body (darker than any lung) seeds a barrier, so that a lung behind a thin chest wall
    # does not leak into it
    air_lab, _ = ndimage.label(work < 0.5 * lung_lv)
    outside = np.isin(air_lab, np.unique(np.concatenate([air_lab[0], air_lab[-1], air_lab[:, 0], air_lab[:, -1]])))
    outside &= air_lab > 0
    barrier = ndimage.binary_dilation(outside, iterations=3)
    # try several thresholds between lung and tissue and keep the one giving the largest pair of enclosed dark
    # regions, one on each side (too high: the lungs merge or leak; too low: ribs cut them into pieces)
    best, best_score, single, single_size = None, 0.0, None, 0.0
    for frac in (0.5, 0.42, 0.35, 0.28, 0.21, 0.14, 0.07):
        lab, nl = ndimage.label((work < lung_lv + frac * (tissue_lv - lung_lv)) & ~barrier)
        if nl == 0:
            continue
        border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])).tolist())
        sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, nl + 1))
        cand = sorted(((sizes[i - 1], i) for i in range(1, nl + 1)
                       if i not in border and sizes[i - 1] > 0.01 * n * n), reverse=True)[:4]
        centres = {i: ndimage.center_of_mass(lab == i)[1] for _, i in cand}
        for j, (sa, ia) in enumerate(cand):
            for sb, ib in cand[j + 1:]:
                if abs(centres[ia] - centres[ib]) > 0.2 * n and min(sa, sb) > best_score:
                    best, best_score = (lab == ia, lab == ib), float(min(sa, sb))
        if cand and cand[0][0] > single_size:
            m = lab == cand[0][1]
            cols = np.flatnonzero(m.any(axis=0))
            if cols[0] < 0.4 * n and cols[-1] > 0.6 * n:
                single, single_size = m, float(cand[0][0])
    if best is not None and (single is None or 2 * best_score > 0.6 * single_size):
        masks = [_tidy(best[0]), _tidy(best[1])]
    elif single is not None:
        # one connected dark region across the midline: split it at the brightest column (the mediastinum)
        cols = np.flatnonzero(single.any(axis=0))
        prof = ndimage.gaussian_filter1d(work.mean(axis=0), 3)
        a, b = cols[0] + (cols[-1] - cols[0]) // 4, cols[0] + 3 * (cols[-1] - cols[0]) // 4
        mid = a + int(np.argmax(prof[a:b])) if b > a else (cols[0] + cols[-1]) // 2
        left, right = single.copy(), single.copy()
        left[:, mid:] = False
        right[:, :mid] = False
        masks = [_tidy(left), _tidy(right)]
    else:
        raise ValueError("no pair of enclosed dark regions (lung fields) found")
    xs = [np.flatnonzero(m.any(axis=0)).mean() for m in masks]
    if xs[0] > xs[1]:
        masks = masks[::-1]
    return LungFields(work, masks[0], masks[1], scale)


def _row_extents(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: has-lung flag, first and last lung column (NaN where absent)."""
    has = mask.any(axis=1)
    idx = np.arange(mask.shape[1])
    first = np.where(has, np.where(mask, idx, mask.shape[1]).min(axis=1), np.nan)
    last = np.where(has, np.where(mask, idx, -1).max(axis=1), np.nan)
    return has, first.astype(float), last.astype(float)


def _refine(profile: np.ndarray, x: float, direction: int, reach: int) -> float:
    """Sub-pixel edge near x: the steepest rise from the lung side to the tissue side.

    direction +1 means tissue lies at larger x than the lung edge, -1 at smaller x. The steepest point of a blurred
    step sits on the edge whatever the two levels are, so vessels next to the border do not bias it.
    """
    n = len(profile)
    xi = int(round(x))
    lo, hi = max(1, xi - reach), min(n - 2, xi + reach)
    if hi - lo < 3:
        return x
    seg = np.arange(lo, hi + 1)
    grad = direction * (profile[seg + 1] - profile[seg - 1]) / 2
    # prefer the edge closest to the coarse one: weight by distance
    grad = grad * np.exp(-(((seg - x) / reach) ** 2))
    k = int(np.argmax(grad))
    if grad[k] <= 0:
        return x
    if 0 < k < len(seg) - 1:
        g0, g1, g2 = grad[k - 1], grad[k], grad[k + 1]
        den = g0 - 2 * g1 + g2
        off = 0.5 * (g0 - g2) / den if den < 0 else 0.0
        return float(seg[k] + np.clip(off, -0.5, 0.5))
    return float(seg[k])


def measure_cardiothoracic(image: np.ndarray) -> dict[str, float] | None:
    """Heart and thoracic widths of a frontal chest image, as fractions of the image width, plus their ratio.

    Heart width = furthest reach of the cardiac border to the image right minus that to the image left, each taken
    in the lower half of the lung field above its own hemidiaphragm; thoracic width = widest span of the lateral
    lung margins in the lower lung zones. Returns None if the lung fields cannot be found.
    """
    try:
        lf = find_lungs(image)
    except ValueError:
        return None
    work = lf.image
    n = work.shape[1]
    reach = max(4, n // 40)
    out = {}
    for name, mask, inward in (("R", lf.left, +1), ("L", lf.right, -1)):
        has, first, last = _row_extents(mask)
        rows = np.flatnonzero(has)
        top, bottom = rows[0], rows[-1]
        # heart border rows: the lower half of the lung field, as long as the tissue next to the lung's inner
        # edge continues upward (heart); where lung lies above it, that edge is the dome, not the heart
        h0 = top + int(0.6 * (bottom - top))  # below the hila
        inner_col = last if inward > 0 else first
        outer_col = first if inward > 0 else last
        heart = []
        prev = None
        for r in range(max(h0, 4), bottom + 1):
            if not has[r]:
                continue
            # in the lower part, a sudden outward jump of the inner edge means the heart has ended on the dome
            if prev is not None and r > (h0 + bottom) / 2 and (prev - inner_col[r]) * inward > max(3, n / 80):
                break
            prev = inner_col[r]
            xt = int(inner_col[r]) + 2 * inward
            if not 0 <= xt < n or mask[r - 4:r, xt].any():
                continue
            heart.append(_refine(work[r], inner_col[r], inward, reach))
        wall = []
        for r in range(top + int(0.5 * (bottom - top)), bottom + 1):
            if has[r]:
                wall.append(_refine(work[r], outer_col[r], -inward, reach))
        if len(heart) < 3 or len(wall) < 3:
            return None
        # a median along the border rejects short outliers (noise, a vessel or rib crossing the margin)
        out[name] = (ndimage.median_filter(np.asarray(heart), size=9, mode="reflect"),
                     ndimage.median_filter(np.asarray(wall), size=9, mode="reflect"))
    (heart_r, wall_r), (heart_l, wall_l) = out["R"], out["L"]
    heart_w = float(np.max(heart_l) - np.min(heart_r))
    thorax_w = float(np.max(wall_l) - np.min(wall_r))
    if thorax_w <= 0 or heart_w <= 0:
        return None
    return {"ctr": heart_w / thorax_w, "heart_width": heart_w / n, "thorax_width": thorax_w / n}


def measure_ctr(image: np.ndarray) -> float:
    """Cardiothoracic ratio of a frontal chest image (display convention: lungs dark, heart bright); NaN if the
    lung fields cannot be found. See `measure_cardiothoracic` for how it is taken."""
    m = measure_cardiothoracic(image)
    return float("nan") if m is None else float(m["ctr"])


def lung_side_means(image: np.ndarray, box: tuple[int, int, int, int]) -> tuple[float, float]:
    """Mean intensity inside `box` (x0, y0, x1, y1, half-open) and inside its mirror image about the vertical centre."""
    img = np.asarray(image, dtype=np.float32)
    x0, y0, x1, y1 = box
    W = img.shape[1]
    mx0, mx1 = W - x1, W - x0
    return float(img[y0:y1, x0:x1].mean()), float(img[y0:y1, mx0:mx1].mean())


def effusion_asymmetry(image: np.ndarray) -> float:
    """Basal density of the image-left hemithorax minus that of the image-right one (> 0: the patient's right base is
    denser, as with a right pleural effusion on a frontal view).

    The box spans the lower quarter of the lung fields down to just below them, from the lateral lung margin to 20%
    of the thoracic width short of the midline, mirrored about the midline of the lung fields (`find_lungs`); if the
    lungs cannot be found, fixed fractions of the image. Calibrated on the phantom's real images: the sign gives the
    side of a one-sided effusion in about 80% of them at 64 px."""
    img = np.asarray(image, np.float32)
    if np.asarray(image).dtype == np.uint8:
        img = img / 255.0
    try:
        lf = find_lungs(img)
    except ValueError:
        h, w = img.shape
        y0, y1, x0, x1 = int(0.5 * h), int(0.85 * h), int(0.08 * w), int(0.42 * w)
        return float(img[y0:y1, x0:x1].mean() - img[y0:y1, w - x1:w - x0].mean())
    work, union = lf.image, lf.left | lf.right
    ys, xs = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
    y0, y1, x0, x1 = ys[0], ys[-1], xs[0], xs[-1]
    mid, h, wd = (x0 + x1) / 2.0, y1 - y0, x1 - x0
    ya, yb = int(y0 + 0.75 * h), int(min(work.shape[0], y1 + 0.15 * h))
    xa, xb = int(x0), int(mid - 0.2 * wd)
    if yb <= ya or xb <= xa:
        return float("nan")
    left = work[ya:yb, xa:xb].mean()
    right = work[ya:yb, int(2 * mid - xb):int(2 * mid - xa)].mean()
    return float(left - right)


def one_sided_effusion(terms_json) -> str | None:
    """'left' or 'right' when the prompt asks for a definite pleural effusion on exactly one side, else None."""
    sides = {t.side for t in terms_from_json(terms_json) if "effusion" in t.pathology and t.certainty == "present"}
    return next(iter(sides)) if len(sides) == 1 and sides <= {"left", "right"} else None


def _auc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    if not len(pos) or not len(neg):
        return None
    from cxrsynth.eval.metrics import auroc

    return auroc(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])


def geometry_block(prefix: str, ctrs: np.ndarray, asked: np.ndarray, sides: Sequence[str | None],
                   asymmetry: np.ndarray) -> dict:
    """Cardiothoracic ratio by group (cardiomegaly asked / not asked: mean, share > 0.5, AUROC of the CTR as a
    score, share unmeasurable) and the share of one-sided effusions whose denser base is on the asked side."""
    ctrs, asked = np.asarray(ctrs, np.float64), np.asarray(asked, bool)
    out: dict = {}
    for name, m in (("asked", asked), ("not_asked", ~asked)):
        v = ctrs[m & np.isfinite(ctrs)]
        out[f"{prefix}/ctr_mean_{name}"] = json_number(v.mean()) if len(v) else None
        out[f"{prefix}/ctr_enlarged_rate_{name}"] = json_number((v > 0.5).mean()) if len(v) else None
        out[f"{prefix}/n_{name}"] = int(m.sum())
    out[f"{prefix}/ctr_auroc"] = json_number(_auc(ctrs[asked], ctrs[~asked]), 4)
    out[f"{prefix}/ctr_unmeasurable_rate"] = json_number((~np.isfinite(ctrs)).mean()) if len(ctrs) else None
    want = np.array([{"right": 1.0, "left": -1.0}.get(s or "", np.nan) for s in sides])
    asym = np.asarray(asymmetry, np.float64)
    ok = np.isfinite(want) & np.isfinite(asym)
    out[f"{prefix}/effusion_side_accuracy"] = json_number((np.sign(asym[ok]) == want[ok]).mean()) if ok.any() else None
    out[f"{prefix}/effusion_n"] = int(ok.sum())
    return out


def measure_geometry(images: np.ndarray, sides: Sequence[str | None], progress: bool = False) -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
    """(CTR per image, effusion asymmetry per image where a side is asked, else NaN)."""
    from tqdm import tqdm

    ctr = np.full(len(images), np.nan)
    asym = np.full(len(images), np.nan)
    for i in tqdm(range(len(images)), desc="geometry", disable=not progress, leave=False):
        ctr[i] = measure_ctr(images[i])
        if sides[i] is not None:
            asym[i] = effusion_asymmetry(images[i])
    return ctr, asym
