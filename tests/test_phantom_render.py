"""The phantom painter: measured on the rendered pixels, over random anatomies, poses and (non-square) sizes."""
import functools

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cxrsynth.data.phantom.render import Rendered, render_image
from cxrsynth.data.phantom.truth import DEVICE_KINDS, KIND_OBSERVATION, Anatomy, Finding, Pose
from cxrsynth.eval.geometry import lung_side_means, measure_ctr


def _anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(sex=str(rng.choice(["F", "M"])), age=int(rng.integers(18, 92)),
                   thorax_width=float(rng.uniform(0.62, 0.78)), lung_height=float(rng.uniform(0.50, 0.64)),
                   ctr=float(rng.uniform(0.38, 0.48)), mediastinum_width=float(rng.uniform(0.22, 0.30)),
                   soft_tissue=float(rng.uniform(0.0, 1.0)))


def _pose(rng: np.random.Generator, view: str = "PA") -> Pose:
    ap = view == "AP"
    return Pose(rotation=float(rng.uniform(-4, 4)), shift_x=float(rng.uniform(-0.035, 0.035)),
                shift_y=float(rng.uniform(-0.03, 0.03)),
                inspiration=float(rng.uniform(8.0, 9.5) if ap else rng.uniform(9.0, 11.0)),
                exposure=float(rng.uniform(0.8, 1.2)), noise=float(rng.uniform(0.006, 0.03 if ap else 0.02)),
                seed=int(rng.integers(0, 2**31 - 1)))


def _size(rng: np.random.Generator, lo: int = 256, hi: int = 420) -> tuple[int, int]:
    r, c = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
    return (r, c + 2) if r == c else (r, c)


def _case(seed: int, view: str = "PA"):
    rng = np.random.default_rng(seed)
    return _anatomy(rng), _pose(rng, view), _size(rng)


def _box_mean(img: np.ndarray, box) -> float:
    x0, y0, x1, y1 = box
    return float(img[y0:y1, x0:x1].mean())


def _decode(rle, shape) -> np.ndarray:
    flat = np.zeros(shape[0] * shape[1], bool)
    for start, length in zip(rle[0::2], rle[1::2]):
        flat[start:start + length] = True
    return flat.reshape(shape)


def _hf_energy(img: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute band-pass response at the scale of vessel markings and parenchymal texture inside a mask."""
    band = ndimage.gaussian_filter(img, 1.0) - ndimage.gaussian_filter(img, 2.0)
    return float(np.abs(band[mask]).mean())


# ---------------------------------------------------------------------------------------------------------------
# basics


@pytest.mark.parametrize("seed,view", [(1, "PA"), (2, "AP"), (3, "LATERAL"), (4, "LL")])
def test_deterministic_seeded_and_well_formed(seed, view):
    anatomy, pose, (rows, cols) = _case(seed, view)
    fs = [Finding("effusion", "right", "moderate"), Finding("et_tube")]
    a = render_image(anatomy, fs, 0.45, view, pose, rows, cols)
    b = render_image(anatomy, fs, 0.45, view, pose, rows, cols)
    assert isinstance(a, Rendered)
    assert a.image.shape == (rows, cols) and rows != cols
    assert a.image.dtype == np.float32
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    assert np.array_equal(a.image, b.image)
    assert a.regions == b.regions and a.landmarks == b.landmarks
    other = render_image(anatomy, fs, 0.45, view, Pose(**{**pose.__dict__, "seed": pose.seed + 1}), rows, cols)
    assert not np.array_equal(a.image, other.image)
    # the image is a radiograph, not a flat field: dark air, bright mediastinum / bone
    assert np.percentile(a.image, 5) < 0.15 and np.percentile(a.image, 95) > 0.7


def test_landmarks_are_json_like_and_inside():
    anatomy, pose, (rows, cols) = _case(5)
    lm = render_image(anatomy, [], 0.44, "PA", pose, rows, cols).landmarks
    for key in ("ctr", "heart_box", "thorax_box", "lung_right_box", "lung_left_box", "dome_y_right", "dome_y_left"):
        assert key in lm
    assert isinstance(lm["ctr"], float)
    for key in ("heart_box", "thorax_box", "lung_right_box", "lung_left_box"):
        x0, y0, x1, y1 = lm[key]
        assert all(isinstance(v, int) for v in lm[key])
        assert 0 <= x0 < x1 <= cols and 0 <= y0 < y1 <= rows
    # patient's right lung on the image's left, right dome higher (smaller y) than the left
    assert lm["lung_right_box"][0] < lm["lung_left_box"][0]
    assert lm["dome_y_right"] < lm["dome_y_left"]
    hb, tb = lm["heart_box"], lm["thorax_box"]
    assert tb[0] <= hb[0] and hb[2] <= tb[2]


# ---------------------------------------------------------------------------------------------------------------
# cardiothoracic ratio


@pytest.mark.parametrize("seed", range(6))
def test_ctr_drawn_exactly_and_measurable(seed):
    rng = np.random.default_rng(100 + seed)
    anatomy = _anatomy(rng)
    view = "AP" if seed % 3 == 0 else "PA"
    for ctr, fs in ((float(rng.uniform(0.38, 0.48)), []),
                    (float(rng.uniform(0.53, 0.70)), [Finding("cardiomegaly")])):
        pose = _pose(rng, view)
        rows, cols = _size(rng, 256, 560)
        out = render_image(anatomy, fs, ctr, view, pose, rows, cols)
        assert abs(out.landmarks["ctr"] - ctr) < 0.01
        m = measure_ctr(out.image)
        assert abs(m - ctr) < 0.04, (m, ctr)
        assert (m > 0.5) == bool(fs)
        if fs:
            assert out.regions[0].kind == "cardiomegaly"
            assert out.regions[0].box == tuple(out.landmarks["heart_box"])


@pytest.mark.parametrize("size", [64, 96, 160, 256])
def test_measure_ctr_on_small_square_images(size):
    rng = np.random.default_rng(7 + size)
    errors = []
    for ctr in (0.40, 0.46, 0.58, 0.66):
        anatomy, pose = _anatomy(rng), _pose(rng)
        rows, cols = _size(rng, 300, 520)
        img = render_image(anatomy, [Finding("cardiomegaly")] if ctr > 0.5 else [], ctr, "PA", pose, rows, cols).image
        # area-average downsampling, as a generator's output would be smooth at its own resolution
        small = ndimage.zoom(ndimage.gaussian_filter(img, 0.4 * rows / size), (size / rows, size / cols), order=1)
        errors.append(measure_ctr(small) - ctr)
    assert np.all(np.isfinite(errors))
    assert np.max(np.abs(errors)) < (0.05 if size < 100 else 0.035), errors


def test_measure_ctr_is_robust_to_exposure_and_noise():
    anatomy, pose, (rows, cols) = _case(8)
    img = render_image(anatomy, [], 0.45, "PA", pose, rows, cols).image
    base = measure_ctr(img)
    rng = np.random.default_rng(0)
    for variant in (img ** 0.7, img ** 1.4, np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1), 0.2 + 0.6 * img):
        assert abs(measure_ctr(variant.astype(np.float32)) - base) < 0.02
    assert np.isnan(measure_ctr(np.zeros((80, 80), np.float32)))


# ---------------------------------------------------------------------------------------------------------------
# findings


@functools.lru_cache(maxsize=32)
def _base(seed, view, ctr):
    anatomy, pose, (rows, cols) = _case(seed, view)
    return render_image(anatomy, [], ctr, view, pose, rows, cols)


def _pair(seed, fs, view="PA", ctr=0.45):
    """The same patient and exposure rendered without and with the findings (the renderer is deterministic)."""
    anatomy, pose, (rows, cols) = _case(seed, view)
    return _base(seed, view, ctr), render_image(anatomy, fs, ctr, view, pose, rows, cols)


def _lateral_part(box, side_is_image_left: bool, frac: float = 0.6):
    x0, y0, x1, y1 = box
    w = int(round((x1 - x0) * frac))
    return (x0, y0, x0 + max(w, 1), y1) if side_is_image_left else (x1 - max(w, 1), y0, x1, y1)


@pytest.mark.parametrize("seed,side", [(10, "right"), (11, "left"), (12, "right"), (13, "left")])
def test_effusion_is_dense_at_the_base_and_grows_with_severity(seed, side):
    heights = []
    for sev in ("small", "moderate", "large"):
        base, eff = _pair(seed, [Finding("effusion", side, sev)])
        reg = eff.regions[0]
        assert reg.kind == "effusion" and reg.mask_rle
        mask = _decode(reg.mask_rle, eff.image.shape)
        assert eff.image[mask].mean() > base.image[mask].mean() + 0.1
        # lateral part of the box against the same box mirrored onto the other (unaffected) side
        part = _lateral_part(reg.box, side_is_image_left=(side == "right"))
        here, mirror = lung_side_means(eff.image, part)
        assert here > mirror + 0.05
        # at the base: below the hila, reaching the dome
        dome = eff.landmarks["dome_y_right" if side == "right" else "dome_y_left"]
        assert reg.box[3] >= dome and reg.box[1] > eff.landmarks["carina"][1]
        heights.append(reg.box[3] - reg.box[1])
    assert heights[0] < heights[1] < heights[2]


def test_bilateral_effusion_marks_both_sides():
    _, eff = _pair(14, [Finding("effusion", "bilateral", "moderate")])
    x0, _, x1, _ = eff.regions[0].box
    mid = (eff.landmarks["midline_top"][0] + eff.landmarks["midline_bottom"][0]) / 2
    assert x0 < mid < x1


@pytest.mark.parametrize("seed,side,sev", [(20, "right", "moderate"), (21, "left", "large"), (22, "left", "small"),
                                           (23, "right", "large")])
def test_pneumothorax_is_darker_and_without_markings(seed, side, sev):
    base, ptx = _pair(seed, [Finding("pneumothorax", side, sev)])
    reg = ptx.regions[0]
    mask = _decode(reg.mask_rle, ptx.image.shape)
    assert mask.sum() > 30
    assert ptx.image[mask].mean() < base.image[mask].mean() - 0.01
    # inside the air space (away from its border and the visceral pleural line): no vessels, no texture
    core = ndimage.binary_erosion(mask, iterations=4)
    core = core if core.sum() > 40 else ndimage.binary_erosion(mask, iterations=2)
    assert _hf_energy(ptx.image, core) < 0.85 * _hf_energy(base.image, core)
    # apical / lateral: the region starts at the top of that lung
    lung = ptx.landmarks["lung_right_box" if side == "right" else "lung_left_box"]
    assert reg.box[1] <= lung[1] + 0.1 * (lung[3] - lung[1])


def _change_at(size: int, base: np.ndarray, img: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute change inside a region once both images are resized to size x size (the codebook's input)."""
    def small(a):
        return np.asarray(Image.fromarray(a.astype(np.float32)).resize((size, size), Image.BILINEAR))
    inside = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)) > 127
    return float(np.abs(small(img) - small(base))[inside].mean())


def test_small_pneumothorax_is_visible_at_the_codebook_resolution():
    """The phantom codebook sees 64 px: a small pneumothorax must change its region there about as much as a small
    effusion does, or no alignment can find it (the first phantom's changed it by 0.07 against 0.27)."""
    def change(finding):
        out = []
        for seed in range(40, 46):
            base, img = _pair(seed, [finding], view="AP" if seed % 2 else "PA")
            out.append(_change_at(64, base.image, img.image, _decode(img.regions[0].mask_rle, img.image.shape)))
        return float(np.mean(out))

    ptx, eff = change(Finding("pneumothorax", "right", "small")), change(Finding("effusion", "right", "small"))
    assert eff > 0.15
    assert ptx > 0.5 * eff, (ptx, eff)


@pytest.mark.parametrize("kind,side", [("et_tube", None), ("ng_tube", None), ("central_line", "right"),
                                       ("central_line", "left"), ("picc", "right"), ("pacemaker", "left"),
                                       ("pacemaker", "right")])
def test_devices_are_bright_and_local(kind, side):
    for seed, view in ((30, "AP"), (31, "PA"), (32, "LATERAL")):
        base, dev = _pair(seed, [Finding(kind, side)], view)
        reg = dev.regions[0]
        assert reg.kind == kind
        x0, y0, x1, y1 = reg.box
        diff = dev.image - base.image
        inside = diff[y0:y1, x0:x1]
        assert np.percentile(inside, 99.5) > 0.2  # a metal / contrast stripe runs through the box
        changed = np.abs(diff) > 0.02
        in_box = np.zeros_like(changed)
        in_box[y0:y1, x0:x1] = True
        assert changed[in_box].sum() >= 0.95 * changed.sum()


def test_device_positions():
    _, dev = _pair(33, [Finding("et_tube"), Finding("ng_tube"), Finding("pacemaker", "left")], "AP")
    lm = dev.landmarks
    et, ng, pm = dev.regions
    assert et.box[3] < lm["carina"][1]  # ET tip above the carina
    assert ng.box[3] > lm["dome_y_left"]  # NG tube crosses the diaphragm into the stomach
    mid = lm["midline_top"][0]
    assert (pm.box[0] + pm.box[2]) / 2 > mid  # left-sided generator on the image right


@pytest.mark.parametrize("kind,side,lobe", [("consolidation", "right", "upper"), ("pneumonia", "left", "lower"),
                                            ("consolidation", "right", "middle"), ("pneumonia", "left", "lingula"),
                                            ("consolidation", "left", "upper"), ("pneumonia", "right", "lower")])
def test_consolidation_sits_in_its_lobe(kind, side, lobe):
    base, con = _pair(40 + len(lobe), [Finding(kind, side, "moderate", lobe)])
    reg = con.regions[0]
    mask = _decode(reg.mask_rle, con.image.shape)
    assert con.image[mask].mean() > base.image[mask].mean() + 0.05
    lm = con.landmarks
    mid = (lm["midline_top"][0] + lm["midline_bottom"][0]) / 2
    cy, cx = ndimage.center_of_mass(mask)
    assert (cx < mid) == (side == "right")
    hil = (lm["hilum_right"][1] + lm["hilum_left"][1]) / 2
    dome = lm["dome_y_right"]
    if lobe == "upper":
        assert cy < hil
    elif lobe == "lower":
        assert cy > hil and reg.box[3] > hil + 0.6 * (dome - hil)
    else:
        assert hil - 0.05 * (dome - hil) < cy < dome


def test_edema_raises_perihilar_density_on_both_sides():
    for seed in (50, 51):
        base, ed = _pair(seed, [Finding("edema", "bilateral", "moderate")])
        lm = ed.landmarks
        r = max(4, int(0.06 * ed.image.shape[1]))
        for key, dx in (("hilum_right", -1), ("hilum_left", 1)):
            hx, hy = lm[key]
            box = (int(hx + dx * 1.5 * r) - r, int(hy) - r, int(hx + dx * 1.5 * r) + r, int(hy) + r)
            assert _box_mean(ed.image, box) > _box_mean(base.image, box) + 0.03
        _, mild = _pair(seed, [Finding("edema", "bilateral", "mild")])
        mask = _decode(ed.regions[0].mask_rle, ed.image.shape)
        assert (ed.image - base.image)[mask].mean() > (mild.image - base.image)[mask].mean()


@pytest.mark.parametrize("kind,sev,lo,hi", [("nodule", "small", 0.6, 2.8), ("mass", "large", 3.0, 9.0)])
def test_lesion_size(kind, sev, lo, hi):
    base, les = _pair(60, [Finding(kind, "right", sev, "upper")])
    reg = les.regions[0]
    x0, y0, x1, y1 = reg.box
    d_cm = max(x1 - x0, y1 - y0) / les.landmarks["px_per_cm"]
    assert lo <= d_cm <= hi
    assert _box_mean(les.image, reg.box) > _box_mean(base.image, reg.box) + 0.03


@pytest.mark.parametrize("finding", [Finding("atelectasis", "right", "moderate", "base"),
                                     Finding("atelectasis", "left", "moderate", "lobar"),
                                     Finding("pleural_thickening", "left", "mild", "apical"),
                                     Finding("pleural_thickening", "right", "mild", "lateral"),
                                     Finding("rib_fracture", "right", "mild", "6"),
                                     Finding("enlarged_cardiomediastinum", None, "moderate")])
def test_other_findings_change_their_region(finding):
    base, out = _pair(70, [finding])
    reg = out.regions[0]
    diff = np.abs(out.image - base.image)
    x0, y0, x1, y1 = reg.box
    assert np.percentile(diff[y0:y1, x0:x1], 95) > 0.04
    if finding.kind == "rib_fracture":  # the break is local
        changed = diff > 0.03
        assert changed[y0:y1, x0:x1].sum() >= 0.8 * changed.sum()


def test_enlarged_mediastinum_is_wider():
    anatomy, pose, (rows, cols) = _case(71)
    widths = [render_image(anatomy, fs, 0.45, "PA", pose, rows, cols).landmarks["mediastinum_width"]
              for fs in ([], [Finding("enlarged_cardiomediastinum", None, "severe")])]
    assert widths[1] > 1.3 * widths[0]


# ---------------------------------------------------------------------------------------------------------------
# regions and views


@pytest.mark.parametrize("view", ["PA", "AP", "LATERAL", "LL"])
def test_every_finding_gets_a_valid_region(view):
    rng = np.random.default_rng(80)
    kinds = list(KIND_OBSERVATION)
    anatomy, pose, (rows, cols) = _anatomy(rng), _pose(rng, view), _size(rng)
    fs = []
    for k in kinds:
        side = None if k in ("et_tube", "ng_tube", "edema", "enlarged_cardiomediastinum", "cardiomegaly") else \
            str(rng.choice(["left", "right"]))
        loc = {"consolidation": "lower", "pneumonia": "upper", "nodule": "upper", "mass": "lower",
               "atelectasis": "base", "pleural_thickening": "apical", "rib_fracture": "7"}.get(k)
        sev = {"effusion": "moderate", "pneumothorax": "small", "nodule": "small", "mass": "large"}.get(k, "moderate")
        fs.append(Finding(k, side, sev, loc))
    out = render_image(anatomy, fs, 0.6, view, pose, rows, cols)
    assert len(out.regions) == len(fs)
    for f, reg in zip(fs, out.regions):
        assert reg.kind == f.kind
        x0, y0, x1, y1 = reg.box
        assert 0 <= x0 < x1 <= cols and 0 <= y0 < y1 <= rows, (f.kind, reg.box)
        assert (x1 - x0) * (y1 - y0) > 0
        if reg.mask_rle is not None:
            m = _decode(reg.mask_rle, (rows, cols))
            ys, xs = np.nonzero(m)
            assert m.any() and xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1


def test_lateral_differs_from_frontal_and_shows_its_anatomy():
    anatomy, pose, (rows, cols) = _case(90)
    pa = render_image(anatomy, [], 0.45, "PA", pose, rows, cols)
    lat = render_image(anatomy, [], 0.45, "LATERAL", pose, rows, cols)
    assert np.corrcoef(pa.image.ravel(), lat.image.ravel())[0, 1] < 0.9
    lm = lat.landmarks
    assert lm["sternum_x"] < lm["spine_x"]  # facing left: sternum anterior (image left), spine posterior
    hb = lm["heart_box"]
    assert (hb[0] + hb[2]) / 2 < (lm["sternum_x"] + lm["spine_x"]) / 2  # heart anterior
    assert hb[3] > (lm["thorax_box"][1] + lm["thorax_box"][3]) / 2  # and inferior
    # retrosternal clear space: aerated (darker than the heart)
    assert _box_mean(lat.image, lm["retrosternal_box"]) < _box_mean(lat.image, hb) - 0.05
    big = render_image(anatomy, [Finding("cardiomegaly")], 0.65, "LATERAL", pose, rows, cols)
    assert big.landmarks["heart_depth_ratio"] > lm["heart_depth_ratio"]


def test_lateral_effusion_fills_the_posterior_sulcus():
    base, eff = _pair(91, [Finding("effusion", "bilateral", "moderate")], "LATERAL")
    reg = eff.regions[0]
    mask = _decode(reg.mask_rle, eff.image.shape)
    assert eff.image[mask].mean() > base.image[mask].mean() + 0.05
    cy, cx = ndimage.center_of_mass(mask)
    lm = eff.landmarks
    assert cx > (lm["sternum_x"] + lm["spine_x"]) / 2 and cy > lm["carina"][1]


def test_devices_kinds_cover_truth():
    assert set(DEVICE_KINDS) <= set(KIND_OBSERVATION)


def test_silhouetted_heart_border_is_flagged():
    anatomy, pose, (rows, cols) = _case(92)
    flags = {name: render_image(anatomy, fs, 0.45, "PA", pose, rows, cols).landmarks["heart_border_obscured"]
             for name, fs in (("normal", []), ("rml", [Finding("consolidation", "right", "severe", "middle")]),
                              ("l_eff", [Finding("effusion", "left", "large")]),
                              ("rul", [Finding("consolidation", "right", "moderate", "upper")]))}
    assert flags == {"normal": [], "rml": ["right"], "l_eff": ["left"], "rul": []}
