"""Painter of the phantom dataset: draws a chest radiograph with known anatomy, findings and devices.

`render_image` turns the ground truth of one image (patient `Anatomy`, acquisition `Pose`, the study's `Finding`s and
cardiothoracic ratio) into a float32 display image in [0, 1] (air dark, bone / fluid / metal bright) plus where
every finding was drawn (`Region`) and anatomical landmarks.

How it paints: every output pixel is mapped back into an upright "canonical" frame (undoing the pose's rotation and
shift), where the anatomy is described analytically (lung outlines as signed distances, heart borders as functions
of height) or drawn as polylines with PIL (ribs, vessels, devices; their points are mapped forward into the output).
The sum of all densities is a display-like value D, passed through an S-shaped exposure curve, vignetting and
quantum noise. Frontal views follow the radiological convention: the patient's right is on the image's left.

Randomness: per-image randomness (quantum noise, texture, jitter, the patchiness of an opacity) is derived from
pose.seed only (`np.random.default_rng(pose.seed)` and its spawned children, or generators seeded with pose.seed and
the finding), so an image is a pure function of its arguments. Patient-level layout (the vascular tree, where a
nodule or a consolidation sits) comes from generators keyed by the anatomy and the finding, so a lesion stays put
across the views and follow-up studies of one patient. No global RNG, no clock.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import astuple, dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from cxrsynth.data.phantom.truth import FRONTAL_VIEWS, VIEWS, Anatomy, Finding, Pose, Region

__all__ = ["Rendered", "render_image"]

F32 = np.float32
RIGHT, LEFT = -1, 1  # patient side -> sign of x offset from the midline on frontal views (patient right = image left)
_SIDE_SIGN = {"right": (RIGHT,), "left": (LEFT,), "bilateral": (RIGHT, LEFT)}
# Default side for lateralised findings the sampler left without one.
_DEFAULT_SIDE = {"pacemaker": "left"}


@dataclass
class Rendered:
    """One painted image: display pixels, one Region per input finding (same order), JSON-able landmarks."""

    image: np.ndarray
    regions: list[Region]
    landmarks: dict[str, object] = field(default_factory=dict)


def render_image(anatomy: Anatomy, findings: Sequence[Finding], ctr: float, view: str, pose: Pose, rows: int,
                 columns: int) -> Rendered:
    """Paint one radiograph (rows x columns) of `anatomy` in `view` under `pose`, showing `findings`.

    ctr: cardiothoracic ratio drawn on frontal views (max transverse heart width / internal thoracic width at the
    domes); laterals scale the heart shadow with it. Returns the image (float32 (rows, columns) in [0, 1], display
    convention: air dark), one Region per finding in input order (box in output pixels, half-open; mask_rle for
    effusion, pneumothorax, consolidation, pneumonia, edema, atelectasis) and landmarks in output pixels:
    frontal: ctr (drawn ratio), heart_box, thorax_box (inner rib margins), lung_right_box, lung_left_box,
    dome_y_right, dome_y_left, dome_right/left, cp_angle_right/left, carina, hilum_right/left, aortic_knob,
    gastric_bubble, midline_top/bottom, mediastinum_width (fraction of thoracic width), px_per_cm, device tips;
    lateral: ctr (the study's), heart_box, heart_depth_ratio, thorax_box, dome_y, dome_y_left, posterior_sulcus,
    retrosternal_box, spine_x, sternum_x, carina, hilum, gastric_bubble, px_per_cm.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if rows < 32 or columns < 32:
        raise ValueError(f"image too small: {rows}x{columns}")
    findings = list(findings)
    frame = _Frame(rows, columns, pose)
    ctx = _Ctx(anatomy, findings, float(ctr), view, pose, frame)
    if view in FRONTAL_VIEWS:
        _paint_frontal(ctx)
    else:
        _paint_lateral(ctx)
    image = _develop(ctx)
    for i, r in enumerate(ctx.regions):
        if r is None:  # defensive: every finding gets a region, at worst the whole image
            ctx.regions[i] = Region(findings[i].kind, (0, 0, columns, rows))
    return Rendered(image=image, regions=ctx.regions, landmarks=ctx.landmarks)


# ----------------------------------------------------------------------------------------------------------------
# frames, canvases and small helpers


class _Frame:
    """Maps canonical (upright, centred) coordinates to output pixels: rotation about the image centre + shift."""

    def __init__(self, rows: int, columns: int, pose: Pose):
        self.H, self.W = rows, columns
        th = math.radians(pose.rotation)
        self.c, self.s = math.cos(th), math.sin(th)
        self.ox, self.oy = columns / 2.0, rows / 2.0
        self.dx, self.dy = pose.shift_x * columns, pose.shift_y * rows

    def fwd(self, x, y):
        """Canonical (x, y) -> output continuous coordinates (pixel j spans [j, j+1))."""
        x = np.asarray(x, dtype=float) - self.ox
        y = np.asarray(y, dtype=float) - self.oy
        return self.ox + self.dx + self.c * x - self.s * y, self.oy + self.dy + self.s * x + self.c * y

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Canonical coordinates of every output pixel centre, float32 (rows, columns) each."""
        yy = (np.arange(self.H, dtype=F32) + F32(0.5 - self.oy - self.dy))[:, None]
        xx = (np.arange(self.W, dtype=F32) + F32(0.5 - self.ox - self.dx))[None, :]
        c, s = F32(self.c), F32(self.s)
        return F32(self.ox) + c * xx + s * yy, F32(self.oy) - s * xx + c * yy

    def box(self, x0, y0, x1, y1) -> tuple[int, int, int, int]:
        """Output pixel box (half-open, clipped) around a canonical rectangle."""
        xs, ys = self.fwd([x0, x1, x0, x1], [y0, y0, y1, y1])
        return _clip_box(xs.min(), ys.min(), xs.max(), ys.max(), self.W, self.H)

    def point(self, x, y) -> list[float]:
        px, py = self.fwd(x, y)
        return [round(float(px), 2), round(float(py), 2)]


class _Canvas:
    """A float PIL image for polylines / polygons drawn in canonical coordinates (overwrite semantics)."""

    def __init__(self, frame: _Frame):
        self.frame = frame
        self.img = Image.new("F", (frame.W, frame.H), 0.0)
        self.draw = ImageDraw.Draw(self.img)
        self.bbox = [math.inf, math.inf, -math.inf, -math.inf]  # output pixels touched so far

    def _pts(self, x, y, pad: float = 1.0):
        px, py = self.frame.fwd(x, y)
        b = self.bbox
        b[0], b[1] = min(b[0], float(px.min()) - pad), min(b[1], float(py.min()) - pad)
        b[2], b[3] = max(b[2], float(px.max()) + pad), max(b[3], float(py.max()) + pad)
        return list(zip((px - 0.5).tolist(), (py - 0.5).tolist()))

    def line(self, x, y, width: float, value: float, joint: str | None = None) -> None:
        w = max(1, int(round(width)))
        if w == 1 and width < 1:
            value *= max(width, 0.25)  # sub-pixel lines: fainter instead of thinner
        self.draw.line(self._pts(x, y, w / 2 + 1), fill=float(value), width=w, joint=joint)

    def polygon(self, x, y, value: float) -> None:
        self.draw.polygon(self._pts(x, y), fill=float(value))

    def array(self) -> np.ndarray:
        return np.asarray(self.img, dtype=F32)


def _blurred(parts: Sequence[tuple[_Canvas, float]], sigma: float) -> np.ndarray:
    """Gaussian-blurred weighted sum of canvases, computed only around what was drawn; full-size float32."""
    frame = parts[0][0].frame
    out = np.zeros((frame.H, frame.W), F32)
    m = 3 * max(sigma, 0.3) + 2
    if not all(math.isfinite(c.bbox[0]) for c, _ in parts):
        parts = [(c, w) for c, w in parts if math.isfinite(c.bbox[0])]
        if not parts:
            return out
    x0 = max(0, int(min(c.bbox[0] for c, _ in parts) - m))
    y0 = max(0, int(min(c.bbox[1] for c, _ in parts) - m))
    x1 = min(frame.W, int(math.ceil(max(c.bbox[2] for c, _ in parts) + m)))
    y1 = min(frame.H, int(math.ceil(max(c.bbox[3] for c, _ in parts) + m)))
    if x1 <= x0 or y1 <= y0:
        return out
    acc = None
    for c, w in parts:
        a = np.asarray(c.img, dtype=F32)[y0:y1, x0:x1]
        acc = a * F32(w) if acc is None else acc + a * F32(w)
    out[y0:y1, x0:x1] = ndimage.gaussian_filter(acc, max(sigma, 0.3), truncate=3.0)
    return out


def _soft(sd: np.ndarray, edge: float) -> np.ndarray:
    """Soft inside-mask from an approximate signed distance (negative inside), edge width in pixels."""
    return np.clip(F32(0.5) - sd * F32(1.0 / max(edge, 1e-3)), 0.0, 1.0)


def _smoothstep(a, lo, hi):
    t = np.clip((np.asarray(a) - lo) * (1.0 / (hi - lo)), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _clip_box(x0, y0, x1, y1, W, H) -> tuple[int, int, int, int]:
    bx0 = int(np.clip(math.floor(x0), 0, W - 1))
    by0 = int(np.clip(math.floor(y0), 0, H - 1))
    bx1 = int(np.clip(math.ceil(x1), bx0 + 1, W))
    by1 = int(np.clip(math.ceil(y1), by0 + 1, H))
    return bx0, by0, bx1, by1


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _rle(mask: np.ndarray) -> tuple[int, ...]:
    """(start, length, ...) runs of True over the row-major flattened mask."""
    flat = np.concatenate(([0], mask.ravel().view(np.uint8) if mask.dtype == bool else mask.ravel() > 0, [0]))
    d = np.diff(flat.astype(np.int8))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    out = np.empty(2 * starts.size, dtype=np.int64)
    out[0::2], out[1::2] = starts, ends - starts
    return tuple(int(v) for v in out)


def _curve(px: Sequence[float], py: Sequence[float], n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Smooth Catmull-Rom curve through control points."""
    p = np.stack([np.asarray(px, float), np.asarray(py, float)], 1)
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    seg = len(p) - 3
    t = np.linspace(0, seg, n * seg, endpoint=False)
    i = np.minimum(t.astype(int), seg - 1)
    u = (t - i)[:, None]
    p0, p1, p2, p3 = p[i], p[i + 1], p[i + 2], p[i + 3]
    out = 0.5 * ((2 * p1) + (-p0 + p2) * u + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u ** 2
                 + (-p0 + 3 * p1 - 3 * p2 + p3) * u ** 3)
    out = np.vstack([out, p[-2]])
    return out[:, 0], out[:, 1]


def _key(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def _upsample(small: np.ndarray, H: int, W: int) -> np.ndarray:
    """Separable bilinear resize of a float32 array to exactly (H, W) (cheaper than ndimage.zoom)."""
    sh, sw = small.shape
    yy = np.linspace(0, sh - 1.001, H, dtype=F32)
    xx = np.linspace(0, sw - 1.001, W, dtype=F32)
    y0, x0 = yy.astype(np.int32), xx.astype(np.int32)
    fy, fx = (yy - y0)[:, None], (xx - x0)[None, :]
    rows = small[y0] * (1 - fy) + small[y0 + 1] * fy
    return rows[:, x0] * (1 - fx) + rows[:, x0 + 1] * fx


def _smooth_noise(rng: np.random.Generator, H: int, W: int, cells: int) -> np.ndarray:
    """Smooth random field ~N(0,1)-ish with about `cells` blobs across the shorter side, float32 (H, W)."""
    ch = max(2, int(round(cells * H / min(H, W))))
    cw = max(2, int(round(cells * W / min(H, W))))
    small = rng.standard_normal((ch + 2, cw + 2)).astype(F32)
    yy = np.linspace(1, ch, H, dtype=F32)
    xx = np.linspace(1, cw, W, dtype=F32)
    # separable bilinear upsampling: cheaper than ndimage.zoom and always exactly (H, W)
    y0 = np.floor(yy).astype(int)
    x0 = np.floor(xx).astype(int)
    fy = (yy - y0)[:, None]
    fx = (xx - x0)[None, :]
    rows = small[y0] * (1 - fy) + small[y0 + 1] * fy
    return rows[:, x0] * (1 - fx) + rows[:, x0 + 1] * fx


# ----------------------------------------------------------------------------------------------------------------
# painting context


class _Ctx:
    """State shared by the painters: grids, density accumulators, canvases, regions, landmarks."""

    def __init__(self, anatomy, findings, ctr, view, pose, frame):
        self.anatomy, self.findings, self.ctr, self.view, self.pose, self.frame = (
            anatomy, findings, ctr, view, pose, frame)
        self.H, self.W = frame.H, frame.W
        self.sc = min(self.H, self.W) / 400.0  # blur widths and line widths scale with the image
        self.X, self.Y = frame.grid()
        rng = np.random.default_rng(pose.seed)
        kids = rng.spawn(3)
        self.noise_rng, self.tex_rng, self.jit_rng = kids
        self.patient = _key(astuple(anatomy))
        self.D = np.zeros((self.H, self.W), F32)  # display-like density
        self.regions: list[Region] = [None] * len(findings)  # type: ignore[list-item]
        self.landmarks: dict[str, object] = {}
        self.lung_total: np.ndarray | None = None

    def finding_rng(self, i: int, f: Finding) -> np.random.Generator:
        """Per-image randomness of one finding (texture), independent of the other findings."""
        return np.random.default_rng([self.pose.seed, _key(f.kind, f.side, f.location, f.severity), i])

    def layout_rng(self, f: Finding, salt: int = 0) -> np.random.Generator:
        """Patient-level randomness of where a finding sits (stable across views and studies)."""
        return np.random.default_rng([self.patient, _key(f.kind, f.side, f.location), salt])

    def window(self, x0, y0, x1, y1) -> tuple[slice, slice]:
        """Output-pixel slices covering a canonical rectangle (small objects are painted only there)."""
        bx0, by0, bx1, by1 = self.frame.box(x0, y0, x1, y1)
        return slice(by0, by1), slice(bx0, bx1)

    def canvas(self) -> _Canvas:
        return _Canvas(self.frame)

    def blur(self, a: np.ndarray, sigma_px: float) -> np.ndarray:
        return ndimage.gaussian_filter(a, max(sigma_px, 0.3), truncate=3.0)

    def region(self, i: int, kind: str, mask: np.ndarray | None, fallback: tuple[float, float, float, float],
               with_rle: bool = False) -> None:
        """Store finding i's region: box of `mask` (output pixels), else the canonical fallback rectangle."""
        box = _mask_box(mask) if mask is not None else None
        if box is None or (box[2] - box[0]) * (box[3] - box[1]) < 2:
            box = self.frame.box(*fallback)
            rle = None
        else:
            rle = _rle(mask) if with_rle else None
        self.regions[i] = Region(kind=kind, box=box, mask_rle=rle)


def _sides(f: Finding) -> tuple[int, ...]:
    side = f.side or _DEFAULT_SIDE.get(f.kind, "right")
    return _SIDE_SIGN[side]


# ----------------------------------------------------------------------------------------------------------------
# frontal geometry


class _Lut:
    """A smooth function of one coordinate sampled once and interpolated (the borders are evaluated per pixel)."""

    def __init__(self, fn, lo: float, hi: float, n: int = 1024):
        self.x = np.linspace(lo, hi, n)
        self.y = np.asarray(fn(self.x), dtype=float)
        self.y32 = self.y.astype(F32)
        self.dy32 = np.append(np.diff(self.y), 0.0).astype(F32)
        self.k = F32((n - 1) / (hi - lo))

    def __call__(self, v):
        if np.ndim(v) == 0:
            return float(np.interp(v, self.x, self.y))
        # linear interpolation in float32 (np.interp would work in float64 on a flattened copy)
        t = (np.asarray(v, dtype=F32) - F32(self.x[0])) * self.k
        np.clip(t, 0, len(self.x) - 1.001, out=t)
        i = t.astype(np.int32)
        t -= i
        return self.y32[i] + self.dy32[i] * t


@dataclass
class _Chest:
    """Canonical frontal geometry (pixels): thorax, lungs, domes, heart, mediastinum."""

    W: int
    H: int
    cx: float
    hT: float  # half internal thoracic width (inner rib margins at the domes)
    Lh: float  # apex-to-right-dome height
    y_apex: float
    dome: dict  # side -> y of the dome's top
    cp: dict  # side -> y of the costophrenic angle
    MRD: float  # heart: max extent right of midline (image left)
    MLD: float  # max extent left of midline (image right)
    y_ht: float  # heart top (where the mediastinum becomes heart)
    y_hb: float  # heart bottom (hidden under the left dome)
    med_r: float  # upper mediastinum: right border offset (SVC)
    med_l: float  # upper mediastinum: left border offset (below the knob)
    knob_y: float
    knob_r: float
    carina: tuple
    hila: dict  # side -> (x, y)
    pcx: float  # pixels per cm, horizontally
    pcy: float  # pixels per cm, vertically
    wall: float  # chest wall thickness outside the inner rib margin
    ap: bool
    dv: float  # posterior rib spacing as a fraction of Lh
    edge: float  # soft edge width of organ borders, px

    def __post_init__(self) -> None:
        self._peak: dict = {}
        lo, hi = -0.5 * self.H, 1.5 * self.H
        self._med = {s: _Lut(lambda y, s=s: self._medial(y, s), lo, hi) for s in (RIGHT, LEFT)}
        self._wall = {s: _Lut(lambda y, s=s: self._wall_hw(y, s), lo, hi) for s in (RIGHT, LEFT)}
        self._dome = {s: _Lut(lambda u, s=s: self._dome_y(u, s), -2.0, 3.0) for s in (RIGHT, LEFT)}

    def u(self, X, s):
        """Lateral coordinate on side s: 0 at the midline, 1 at the inner rib margin."""
        return (X - self.cx) * s / self.hT

    # --- exact profiles (evaluated once into lookup tables) ---
    def _dome_y(self, u, s):
        up = 0.45
        d0, cp = self.dome[s], self.cp[s]
        med = d0 + 0.08 * self.Lh * (np.clip(up - u, 0, None) / up) ** 1.7
        lat = d0 + (cp - d0) * (np.clip(u - up, 0, None) / (1 - up)) ** 1.8
        return np.where(u < up, med, lat)

    def _wall_hw(self, Y, s):
        # lateral lung border: rounded apex widening to the inner rib margin just above the dome
        t = (Y - self.y_apex) / (self.dome[s] - self.y_apex)
        tw, ua = 0.9, 0.42
        r = np.clip((tw - t) / tw, 0, 1)
        return self.hT * (ua + (1 - ua) * np.sqrt(np.clip(1 - r ** 1.7, 0, 1)))

    def _heart(self, Y, s):
        """Heart border offset at Y on side s; its maximum over Y is exactly MRD (right) / MLD (left)."""
        tau = (Y - self.y_ht) / (self.y_hb - self.y_ht)
        peak = self._peak.get(s)
        if peak is None:  # normalise the shape once so that the drawn width is exactly the requested one
            self._peak[s] = 1.0
            peak = self._peak[s] = float(np.max(self._heart(self.y_ht + np.linspace(-0.2, 1.2, 4001) * (
                self.y_hb - self.y_ht), s))) / (self.MRD if s == RIGHT else self.MLD)
        return self._heart_shape(tau, s) / peak

    def _heart_shape(self, tau, s):
        if s == RIGHT:
            # SVC straight, then the right atrium as a convex arc reaching MRD at tau = 0.74
            m0 = min(self.med_r / self.MRD, 0.95)
            a = np.clip((0.74 - tau) / 0.52, 0, 1)
            p = m0 + (1 - m0) * np.clip(1 - a ** 2, 0, 1) ** 0.75
            p = p - 0.05 * (np.clip(tau - 0.74, 0, None) / 0.26) ** 2
            return self.MRD * p
        # left: pulmonary trunk bump, then the left ventricle as a convex arc reaching MLD at tau = 0.8
        m1 = min(self.med_l * 0.95 / self.MLD, 0.8)
        a = np.clip((0.8 - tau) / 0.56, 0, 1)
        lv = m1 + (1 - m1) * np.clip(1 - a ** 2, 0, 1) ** 0.75 + 0.06 * (1 - m1) * _smoothstep(tau, 0.1, 0.3)
        trunk = m1 + 0.12 * (1 - m1) * np.exp(-(((tau - 0.06) / 0.08) ** 2))
        p = np.maximum(lv, trunk) - 0.04 * (np.clip(tau - 0.8, 0, None) / 0.2) ** 2
        return self.MLD * p

    def _medial(self, Y, s):
        tau = (Y - self.y_ht) / (self.y_hb - self.y_ht)
        w = _smoothstep(tau, -0.05, 0.04)
        taper = 0.85 + 0.15 * _smoothstep(Y, self.y_apex - 0.1 * self.Lh, self.y_ht)
        if s == RIGHT:
            upper = self.med_r * taper
        else:
            dk = (Y - self.knob_y) / self.knob_r
            knob = self.knob_r * 0.55 * np.sqrt(np.clip(1 - (dk / 1.3) ** 2, 0, 1))
            window = -0.07 * self.med_l * np.exp(-(((Y - self.knob_y - 1.8 * self.knob_r) / self.knob_r) ** 2))
            upper = self.med_l * taper + knob + window
        border = upper * (1 - w) + self._heart(Y, s) * w
        # medial side of the apex: the lung top curves down to the mediastinum
        t = (Y - self.y_apex) / (self.dome[s] - self.y_apex)
        tm, ua = 0.22, 0.42
        r = np.clip((tm - t) / tm, 0, 1)
        apex = self.hT * (ua - 0.3 * np.sqrt(np.clip(1 - r ** 2, 0, 1)))
        return np.maximum(border, np.where(t < tm, apex, 0.0))

    # --- fast versions used on the pixel grids ---
    def dome_y(self, u, s):
        """y of the diaphragm under lateral coordinate u on side s (peak at u = 0.45, CP angle at u = 1)."""
        return self._dome[s](u)

    def wall_hw(self, Y, s):
        """Half width (from the midline) of the lung's lateral border at height Y on side s."""
        return self._wall[s](Y)

    def medial(self, Y, s):
        """Offset from the midline of what bounds the lung medially (mediastinum, heart, apex) at height Y."""
        return self._med[s](Y)

    def lung_sd(self, X, Y, s, dome_lift: float = 0.0, wall=None, med=None):
        """Approximate signed distance (px, negative inside) to the lung on side s (wall/med: precomputed)."""
        ax = (X - self.cx) * s
        u = ax * (1.0 / self.hT)
        wall = self.wall_hw(Y, s) if wall is None else wall
        med = self.medial(Y, s) if med is None else med
        d = np.maximum(ax - wall, med - ax)
        d = np.maximum(d, Y - (self.dome_y(u, s) - dome_lift))
        return np.maximum(d, self.y_apex - Y)

    def heart_rect(self):
        """Canonical box of the cardiac silhouette: widest reach each side, top of the heart to the left dome."""
        return self.cx - self.MRD, self.y_ht, self.cx + self.MLD, self.dome[LEFT] + 0.02 * self.Lh

    def lung_box(self, s):
        x_in = self.cx + s * (self.med_r if s == RIGHT else self.med_l) * 0.8
        x_out = self.cx + s * self.hT
        return min(x_in, x_out), self.y_apex, max(x_in, x_out), self.cp[s]

    def to_xy(self, u, v, s):
        """Normalised lung coordinates (u lateral, v = fraction of Lh below the apex) -> canonical pixels."""
        return self.cx + s * np.asarray(u) * self.hT, self.y_apex + np.asarray(v) * self.Lh


def _chest_geometry(ctx: _Ctx) -> _Chest:
    a, pose, W, H = ctx.anatomy, ctx.pose, ctx.W, ctx.H
    ap = ctx.view == "AP"
    mag = 1.06 if ap else 1.0  # portable AP: shorter source distance, the chest projects larger
    Tw = min(a.thorax_width * mag, 0.86) * W
    hT = Tw / 2
    insp = pose.inspiration - (0.6 if ap else 0.0)
    Lh = a.lung_height * H * (1 + 0.03 * (insp - 9.5)) * (0.97 if ap else 1.0) * mag
    Lh = float(min(Lh, 0.72 * H))
    y_apex = 0.45 * H - 0.5 * Lh
    dome = {RIGHT: y_apex + Lh, LEFT: y_apex + 1.035 * Lh}
    cp = {RIGHT: dome[RIGHT] + 0.09 * Lh, LEFT: dome[LEFT] + 0.085 * Lh}
    # volume loss from lobar atelectasis lifts that hemidiaphragm
    for f in ctx.findings:
        if f.kind == "atelectasis" and f.location == "lobar":
            for s in _sides(f):
                dome[s] -= 0.05 * Lh
                cp[s] -= 0.05 * Lh
    ctr = float(ctx.ctr)
    frac_r = float(np.clip(0.30 + 0.25 * (ctr - 0.4), 0.28, 0.40))
    MRD, MLD = ctr * Tw * frac_r, ctr * Tw * (1 - frac_r)
    mw = a.mediastinum_width
    for f in ctx.findings:
        if f.kind == "enlarged_cardiomediastinum":
            mw *= {"mild": 1.35, "moderate": 1.55, "severe": 1.75}.get(f.severity, 1.55)
    # upper mediastinal width (SVC border to the aortic knob's lateral border) is mw of the thoracic width
    knob_r = 0.045 * Tw
    med_r = 0.4 * (mw * Tw - 0.55 * knob_r)
    med_l = 0.6 * (mw * Tw - 0.55 * knob_r)
    pcx, pcy = Tw / 28.0, Lh / 25.0
    y_ht = y_apex + 0.40 * Lh
    y_hb = dome[LEFT] + 0.04 * Lh
    carina = (W / 2 - 0.012 * Tw, y_apex + 0.29 * Lh)
    hila = {RIGHT: (W / 2 - med_r - 0.05 * Tw, carina[1] + 0.11 * Lh),
            LEFT: (W / 2 + med_l + 0.045 * Tw, carina[1] + 0.07 * Lh)}
    wall = pcx * (1.6 + 3.2 * a.soft_tissue)
    # rib spacing so that posterior rib number `insp` crosses the right dome at mid-hemithorax
    dv = 1.0 / max(insp - 0.35, 5.0)
    return _Chest(W=W, H=H, cx=W / 2, hT=hT, Lh=Lh, y_apex=y_apex, dome=dome, cp=cp, MRD=MRD, MLD=MLD, y_ht=y_ht,
                  y_hb=y_hb, med_r=med_r, med_l=med_l, knob_y=y_apex + 0.2 * Lh, knob_r=knob_r,
                  carina=carina, hila=hila, pcx=pcx, pcy=pcy, wall=wall, ap=ap, dv=dv,
                  edge=max(0.9, 1.5 * ctx.sc))


# ----------------------------------------------------------------------------------------------------------------
# frontal painter


def _paint_frontal(ctx: _Ctx) -> None:
    g = _chest_geometry(ctx)
    ctx.g = g
    X, Y = ctx.X, ctx.Y
    ax = np.abs(X - F32(g.cx))
    V = (Y - F32(g.y_apex)) / F32(g.Lh)

    ctx.med = {s: g.medial(Y, s) for s in (RIGHT, LEFT)}
    lung_sd = {s: g.lung_sd(X, Y, s, wall=g.wall_hw(Y, s), med=ctx.med[s]) for s in (RIGHT, LEFT)}
    lung = {s: _soft(lung_sd[s], g.edge) for s in (RIGHT, LEFT)}
    lung_total = lung[RIGHT] + lung[LEFT]
    ctx.lung_sd, ctx.lung, ctx.lung_total = lung_sd, lung, lung_total
    # findings that replace lung air use a mask that is full already at the soft margin (no dark rim left)
    ctx.inside = {s: np.clip(2 * lung[s], 0, 1) for s in (RIGHT, LEFT)}

    # effect accumulators the findings write into
    ctx.air_scale = np.ones_like(X)  # multiplies lung air (fluid / opacity < 1, pneumothorax > 1)
    ctx.mark_vis = np.ones_like(X)  # visibility of vascular markings and lung texture
    ctx.add = np.zeros_like(X)  # extra density
    ctx.vessel_blur = 0.0  # edema: indistinct vessels
    ctx.fracture = {}
    for i, f in enumerate(ctx.findings):
        if f.kind == "rib_fracture":
            for s in _sides(f):
                k = int(f.location) if (f.location or "").isdigit() else 6
                ctx.fracture[(s, int(np.clip(k, 1, 12)))] = i

    _soft_tissue(ctx, g, ax, V)
    bones, bones_air = _bones_frontal(ctx, g)
    for i, f in enumerate(ctx.findings):
        _FRONTAL_PAINTERS[f.kind](ctx, g, i, f)
    ctx.landmarks["heart_border_obscured"] = _obscured_borders(ctx, g, ax)

    # lungs: blend the soft tissue toward the aerated-lung level; fluid or opacity (air_scale < 1) pulls it back
    # toward tissue, a pneumothorax (air_scale > 1) pushes it darker than lung
    u = ax * F32(1.0 / g.hT)
    # the lung is thin near its margins (and the apices sit under the shoulder girdle): brighter there
    rim = np.exp(np.minimum(np.minimum(lung_sd[RIGHT], lung_sd[LEFT]), 0) * F32(1.0 / (1.8 * g.pcx)))
    lung_level = (F32(0.25 + 0.04 * ctx.anatomy.soft_tissue) + F32(0.05) * (1 - np.clip(V * 3, 0, 1))
                  + F32(0.025) * np.clip(u, 0, 1) ** 2 + F32(0.09) * rim)
    air = lung_total * ctx.air_scale
    ctx.D += ctx.tissue + air * (lung_level - ctx.tissue)
    vessels = _vessels(ctx, g)
    if ctx.vessel_blur > 0:
        vessels = (1 - ctx.vessel_blur) * vessels + ctx.vessel_blur * 1.2 * ctx.blur(vessels, 2.2 * ctx.sc)
    tex = _lung_texture(ctx)
    ctx.D += (vessels + F32(0.024) * tex) * lung_total * ctx.mark_vis
    # bones add the same attenuation everywhere, but read best against air: damp them over dense areas
    # (fluid or consolidation in front of a rib lowers its contrast only partly)
    rib_vis = lung_total * (F32(0.3) + F32(0.7) * np.clip(ctx.air_scale, 0, 1))
    ctx.D += bones + bones_air * (F32(0.25) + F32(0.75) * np.clip(rib_vis, 0, 1))
    ctx.D += ctx.add
    _landmarks_frontal(ctx, g)


def _obscured_borders(ctx: _Ctx, g: _Chest, ax: np.ndarray) -> list[str]:
    """Sides whose lower heart border is silhouetted by an opacity drawn against it (effusion, consolidation, mass):
    there the cardiothoracic ratio cannot be read off the image."""
    Y = ctx.Y
    band = (Y > g.y_ht + 0.45 * (g.y_hb - g.y_ht)) & (Y < g.dome[LEFT])
    out = []
    for s, name in ((RIGHT, "right"), (LEFT, "left")):
        strip = band & ((ctx.X - g.cx) * s > 0) & (ax > ctx.med[s]) & (ax < ctx.med[s] + 4 * ctx.sc + 2) & (
            ctx.lung[s] > 0.3)
        if strip.sum() > 3 and float(np.mean(ctx.air_scale[strip] < 0.5)) > 0.2:
            out.append(name)
    return out


def _soft_tissue(ctx: _Ctx, g: _Chest, ax: np.ndarray, V: np.ndarray) -> None:
    """Body outline and soft tissue, heart, breasts, mediastinal air, stomach bubble."""
    X, Y, sc, a = ctx.X, ctx.Y, ctx.sc, ctx.anatomy
    W = ctx.W
    bw0 = g.hT + g.wall
    acro = bw0 + 0.07 * W
    # the trunk follows the rib cage, widened at the top by the shoulder girdle, tapering toward the waist
    cage = np.maximum(g.wall_hw(Y, RIGHT), 0.8 * g.hT) + g.wall
    sh = _smoothstep(Y, g.y_apex + 0.05 * g.Lh, g.y_apex + 0.5 * g.Lh)
    bw = np.maximum(cage, acro * (1 - sh) + cage * sh)
    bw = bw * (1 - 0.05 * _smoothstep(Y, g.cp[RIGHT], g.cp[RIGHT] + 0.4 * g.Lh))
    neck = 0.36 * g.hT
    # shoulders: the skin line slopes from the neck down and out to the acromion
    y_top = g.y_apex - 0.24 * g.Lh
    y_sh = y_top + 0.2 * g.Lh * (np.clip(ax - neck, 0, None) / (acro - neck)) ** 1.8
    above = np.clip(0.5 + (Y - y_sh) / (1.5 * sc), 0, 1)
    trunk = _soft(ax - bw, 1.4 * sc) * above
    prof = np.sqrt(np.clip(1 - (ax / (bw * 1.03)) ** 2, 0, 1))
    neck_thin = 0.8 + 0.2 * _smoothstep(Y, y_top, g.y_apex + 0.1 * g.Lh)
    tissue = (0.66 + 0.04 * a.soft_tissue) * prof ** 0.55 * trunk * neck_thin
    # the lateral chest wall (ribs and muscle seen tangentially) stays bright right up to the lung margin
    tissue = tissue + 0.14 * _smoothstep(ax, 0.7 * g.hT, 0.97 * g.hT) * _soft(ax - bw + 0.3 * g.wall, 2 * sc) * above
    below = _smoothstep(Y, g.dome[RIGHT] - 0.02 * g.Lh, g.cp[RIGHT] + 0.1 * g.Lh)  # liver, spleen
    tissue = tissue + 0.04 * below * trunk
    ctx.body = trunk.astype(F32)

    # heart: a little denser than the upper mediastinum (it is thicker front to back)
    dxh = X - g.cx
    heart = _soft(np.maximum(-dxh - ctx.med[RIGHT], dxh - ctx.med[LEFT]), g.edge) * _smoothstep(
        Y, g.y_ht - 0.02 * g.Lh, g.y_ht + 0.15 * g.Lh) * (1 - _smoothstep(Y, g.dome[LEFT], g.y_hb + 0.06 * g.Lh))
    # slow, large-scale unevenness of the soft tissue (no body is a perfect ellipse)
    lowfreq = _smooth_noise(ctx.jit_rng, ctx.H, ctx.W, 4)
    heart_core = np.exp(-((dxh - 0.3 * g.MLD) / (0.9 * g.MLD)) ** 2)  # thickest through the ventricles
    ctx.tissue = (tissue + (F32(0.03) + F32(0.04) * heart_core) * heart + F32(0.015) * lowfreq * trunk).astype(F32)

    # breasts (female): soft-tissue shadows over the lower zones with a sharp inferior margin
    if a.sex == "F":
        for s in (RIGHT, LEFT):
            bx, by = g.cx + s * 0.62 * g.hT, g.dome[s] - 0.12 * g.Lh
            rx, ry = (0.42 + 0.1 * a.soft_tissue) * g.hT, 0.2 * g.Lh * (0.9 + 0.3 * a.soft_tissue)
            w = ctx.window(bx - rx, by - ry, bx + rx, by + ry)
            Xw, Yw = X[w], Y[w]
            r2 = ((Xw - bx) / rx) ** 2 + ((Yw - by) / ry) ** 2
            ctx.D[w] += F32(0.06 + 0.05 * a.soft_tissue) * (np.sqrt(np.clip(1 - r2, 0, 1)) ** 0.5 * _smoothstep(
                Yw, by - 1.1 * ry, by + 0.1 * ry)).astype(F32)

    # mediastinal air: trachea, carina, main bronchi
    air = ctx.canvas()
    cxr, cyr = g.carina
    tw = 0.06 * 2 * g.hT
    tx, ty = _curve([g.cx + 0.004 * g.hT, g.cx + 0.003 * g.hT, g.cx - 0.018 * g.hT, cxr],
                    [-0.05 * ctx.H, g.y_apex, g.knob_y, cyr])
    air.line(tx, ty, tw, 1.0)
    for s, (ex, ey), w in ((RIGHT, (cxr - 0.15 * g.hT, cyr + 0.085 * g.Lh), 0.75),
                           (LEFT, (cxr + 0.22 * g.hT, cyr + 0.10 * g.Lh), 0.65)):
        bx_, by_ = _curve([cxr, (cxr + ex) / 2 + s * 0.01 * g.hT, ex], [cyr - 0.01 * g.Lh, (cyr + ey) / 2, ey], 12)
        air.line(bx_, by_, tw * w, 0.8)
    ctx.D -= F32(0.13) * _blurred([(air, 1.0)], 1.2 * sc)

    # gastric bubble under the left dome: air above a flat fluid level
    gx, gy = g.cx + 0.5 * g.hT, g.dome[LEFT] + 0.085 * g.Lh
    rx, ry = 0.15 * g.hT, 0.05 * g.Lh
    w = ctx.window(gx - rx, gy - ry, gx + rx, gy + ry)
    r2 = ((X[w] - gx) / rx) ** 2 + ((Y[w] - gy) / ry) ** 2
    bubble = np.clip((1 - r2) * 3, 0, 1) * np.clip((gy + 0.2 * ry - Y[w]) / (0.8 * sc) + 0.5, 0, 1)
    ctx.D[w] -= F32(0.2) * bubble.astype(F32)
    ctx.bubble = (gx, gy)


def _rib_path(g: _Chest, k: int, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Posterior and anterior centrelines of rib k on side s, canonical pixels."""
    ap = g.ap
    v0 = -0.04 + g.dv * ((k - 1) + 0.018 * (k - 1) ** 2)
    y0 = g.y_apex + v0 * g.Lh
    dvp = g.dv * g.Lh
    u0 = 0.085
    ulat = 1.06 if k > 1 else 0.85
    uend = ulat if k < 11 else (0.75 if k == 11 else 0.55)
    uu = np.linspace(u0, uend, 22)
    w = (uu - u0) / (1.0 - u0)
    arch = 1.3 if ap else 1.0  # lordotic AP projection: posterior ribs look more arched
    py = y0 + dvp * (-1.25 * arch * w + (2.4 + 0.4 * (arch - 1)) * w ** 3)
    px = g.cx + s * uu * g.hT
    # anterior rib: from the lateral end, obliquely down and medially (flatter when lordotic)
    slope = 1.2 if ap else 2.2
    ua = np.linspace(ulat, 0.3 + 0.02 * k, 16)
    wa = (ulat - ua) / (ulat - ua[-1])
    ay = py[-1] + dvp * slope * (1.0 - (1.0 - wa) ** 1.5)
    return px, py, g.cx + s * ua * g.hT, ay


def _bones_frontal(ctx: _Ctx, g: _Chest) -> tuple[np.ndarray, np.ndarray]:
    """(bone density seen everywhere, bone density that reads mostly against lung air)."""
    sc = ctx.sc
    outer, inner, ant, bone = ctx.canvas(), ctx.canvas(), ctx.canvas(), ctx.canvas()
    rib_h = 0.44 * g.dv * g.Lh
    jit = ctx.jit_rng
    for s in (RIGHT, LEFT):
        for k in range(1, 13):
            px, py, qx, qy = _rib_path(g, k, s)
            h = rib_h * (0.8 if k == 1 else 1.0) * (1 + 0.04 * jit.standard_normal())
            fi = ctx.fracture.get((s, k))
            if fi is not None:
                # cortical break with a step, between two points of the posterolateral arc; every other segment is
                # drawn exactly as in the intact rib
                j = int(len(px) * 0.6)
                fx, fy = (px[j] + px[j + 1]) / 2, (py[j] + py[j + 1]) / 2
                tx_, ty_ = px[j + 1] - px[j], py[j + 1] - py[j]
                n = math.hypot(tx_, ty_) + 1e-6
                gap, off = max(2.0, 0.5 * h), 0.7 * h
                mx = np.append(px[: j + 1], fx - tx_ / n * gap / 2)
                my = np.append(py[: j + 1], fy - ty_ / n * gap / 2)
                lx = np.insert(px[j + 1:], 0, fx + tx_ / n * gap / 2)
                ly = np.insert(py[j + 1:], 0, fy + ty_ / n * gap / 2 + off)  # displaced fragment end
                for cx_, cy_ in ((mx, my), (lx, ly)):
                    outer.line(cx_, cy_, h, 1.0)
                    inner.line(cx_, cy_, 0.5 * h, 1.0)
                box = ctx.frame.box(fx - 1.3 * h, fy - 1.1 * h, fx + 1.3 * h, fy + 1.5 * h)
                old = ctx.regions[fi]
                if old is not None:  # bilateral: one box over both breaks
                    box = (min(box[0], old.box[0]), min(box[1], old.box[1]), max(box[2], old.box[2]),
                           max(box[3], old.box[3]))
                ctx.regions[fi] = Region("rib_fracture", box)
                ctx.landmarks.setdefault("fracture_points", []).append(ctx.frame.point(fx, fy))
            else:
                outer.line(px, py, h, 1.0)
                inner.line(px, py, 0.5 * h, 1.0)
            if k <= 10:
                ant.line(qx, qy, h * 0.9, 1.0 if k < 8 else 0.6)
    # clavicles: S-shaped, from the sternal notch up and out to the acromion (higher and flatter when lordotic)
    for s in (RIGHT, LEFT):
        ux = np.array([0.1, 0.35, 0.7, 1.15])
        vy = np.array([0.09, 0.06, 0.01, -0.05]) if not g.ap else np.array([0.0, -0.02, -0.05, -0.08])
        cxs, cys = _curve(g.cx + s * ux * g.hT, g.y_apex + vy * g.Lh, 12)
        outer.line(cxs, cys, 0.09 * g.hT, 1.3)
        inner.line(cxs, cys, 0.045 * g.hT, 1.3)
        # scapula: lateral to the lungs on PA; rotated over the upper lungs on AP
        um = 0.74 if g.ap else 0.98
        sx = g.cx + s * np.array([1.14, um, um + 0.12, 1.2]) * g.hT
        sy = g.y_apex + np.array([-0.03, 0.03, 0.55, 0.25]) * g.Lh
        bone.polygon(sx, sy, 0.5)
        # humeral head at the top corner, with its shaft
        hx, hy = g.cx + s * (g.hT + g.wall + 0.065 * ctx.W), g.y_apex + 0.01 * g.Lh
        r = 0.16 * g.hT
        tt = np.linspace(0, 2 * math.pi, 40)
        bone.polygon(hx + r * np.cos(tt), hy + r * np.sin(tt), 0.7)
        bone.line(np.array([hx, hx + s * 0.03 * ctx.W]), np.array([hy, hy + 0.7 * g.Lh]), 1.1 * r, 0.6)
    # spine: vertebral bodies with end plates, pedicles, spinous processes
    spine = ctx.canvas()
    vw = 0.11 * g.hT
    tt = np.linspace(0, 2 * math.pi, 16)
    for k in range(-3, 14):
        v0 = -0.04 + g.dv * ((k - 1) + 0.018 * max(k - 1, 0) ** 2)
        y0 = g.y_apex + v0 * g.Lh
        hgt = g.dv * g.Lh * (1 + 0.036 * max(k - 1, 0))
        top, bot = y0 - 0.25 * hgt, y0 + 0.55 * hgt
        spine.polygon(np.array([g.cx - vw, g.cx + vw, g.cx + vw, g.cx - vw]), np.array([top, top, bot, bot]), 0.6)
        for s in (RIGHT, LEFT):
            spine.polygon(g.cx + s * 0.78 * vw + 0.2 * vw * np.cos(tt), y0 + 0.28 * hgt * np.sin(tt), 1.0)
        spine.line(np.array([g.cx, g.cx]), np.array([y0 + 0.2 * hgt, y0 + 0.62 * hgt]), 0.28 * vw, 0.9)
    # cortical look: the rim of each band brighter than its middle; one blur per visibility class
    against_air = _blurred([(outer, 0.12), (inner, -0.054), (ant, 0.035)], 0.75 * sc)
    everywhere = _blurred([(bone, 0.06), (spine, 0.03)], 0.95 * sc)
    return everywhere, against_air


def _vessel_tree(patient: int, s: int) -> np.ndarray:
    """Pulmonary vascular tree of one lung in cm from the hilum (x lateral, y down).

    Rows (x0, y0, xm, ym, x1, y1, width_cm): each branch is a slightly bent segment through a jittered midpoint.
    """
    rng = np.random.default_rng([patient, 7, s + 5])
    segs = []
    for base in (-78, -55, -32, -10, 10, 30, 50, 70, 92, 115):
        a0 = math.radians(base + rng.normal(0, 6))
        upper = base < -5
        w0 = (0.5 if upper else 0.75) * (0.9 + 0.2 * rng.random())
        stack = [(0.0, 0.0, a0, (2.2 if upper else 2.6) + 0.6 * rng.random(), w0, 0)]
        while stack:
            x, y, ang, ln, w, gen = stack.pop()
            x1, y1 = x + ln * math.cos(ang), y + ln * math.sin(ang)
            bend = rng.normal(0, 0.08) * ln
            xm, ym = (x + x1) / 2 - bend * math.sin(ang), (y + y1) / 2 + bend * math.cos(ang)
            segs.append((x, y, xm, ym, x1, y1, w))
            if gen < 5:
                spread = math.radians(18 + 16 * rng.random())
                bias = rng.normal(0, 0.12)
                for sign in (-1, 1):
                    if gen >= 3 and rng.random() < 0.2:
                        continue  # prune: the periphery is sparse
                    stack.append((x1, y1, ang + sign * spread + bias, ln * (0.66 + 0.16 * rng.random()),
                                  w * (0.6 + 0.12 * rng.random()), gen + 1))
    return np.array(segs, dtype=float)


_TREE_CACHE: dict = {}


def _vessels(ctx: _Ctx, g: _Chest) -> np.ndarray:
    """Vascular markings branching from the hila, thinner and fainter toward the periphery."""
    cv = ctx.canvas()
    draw = cv.draw
    for s in (RIGHT, LEFT):
        key = (ctx.patient, s)
        segs = _TREE_CACHE.get(key)
        if segs is None:
            segs = _TREE_CACHE[key] = _vessel_tree(ctx.patient, s)
            if len(_TREE_CACHE) > 512:
                _TREE_CACHE.pop(next(iter(_TREE_CACHE)))
        hx, hy = g.hila[s]
        xs = hx + s * segs[:, 0:6:2] * g.pcx
        ys = hy + segs[:, 1:6:2] * g.pcy
        px, py = ctx.frame.fwd(xs, ys)
        pad = float(segs[:, 6].max() * g.pcx) + 2
        b = cv.bbox
        b[0], b[1] = min(b[0], float(px.min()) - pad), min(b[1], float(py.min()) - pad)
        b[2], b[3] = max(b[2], float(px.max()) + pad), max(b[3], float(py.max()) + pad)
        px, py = (px - 0.5).tolist(), (py - 0.5).tolist()
        wpx = segs[:, 6] * g.pcx
        val = 0.16 * np.clip(segs[:, 6] / 0.75, 0.1, 1.0) ** 0.6 * np.minimum(wpx, 1.0)
        wi = np.maximum(1, np.round(wpx)).astype(int).tolist()
        val = val.tolist()
        for j in range(len(wi)):
            a, b = px[j], py[j]
            draw.line([(a[0], b[0]), (a[1], b[1]), (a[2], b[2])], fill=val[j], width=wi[j])
    v = _blurred([(cv, 1.0)], 0.85 * ctx.sc)
    # hilar shadow: the proximal arteries overlap into a lobulated density
    for s in (RIGHT, LEFT):
        hx, hy = g.hila[s]
        hx += s * 0.02 * g.hT
        w = ctx.window(hx - 0.25 * g.hT, hy - 0.22 * g.Lh, hx + 0.25 * g.hT, hy + 0.22 * g.Lh)
        r2 = ((ctx.X[w] - hx) / (0.08 * g.hT)) ** 2 + ((ctx.Y[w] - hy) / (0.07 * g.Lh)) ** 2
        v[w] += F32(0.05) * np.exp(-r2).astype(F32)
    return v


def _lung_texture(ctx: _Ctx) -> np.ndarray:
    """Band-pass parenchymal texture, unit variance."""
    # drawn at half resolution (it is band-limited anyway) and upsampled: a quarter of the filtering cost
    h2, w2 = ctx.H // 2 + 2, ctx.W // 2 + 2
    n = ctx.tex_rng.standard_normal((h2, w2), dtype=F32)
    a = ctx.blur(n, 0.7 * ctx.sc)
    t = a - ctx.blur(a, 1.5 * ctx.sc)
    t = _upsample(t, ctx.H, ctx.W)
    return t / F32(t.std() + 1e-6)


# ----------------------------------------------------------------------------------------------------------------
# frontal findings


def _f_cardiomegaly(ctx, g, i, f):
    ctx.regions[i] = Region(f.kind, ctx.frame.box(*g.heart_rect()))


def _f_mediastinum(ctx, g, i, f):
    ctx.regions[i] = Region(f.kind, ctx.frame.box(g.cx - g.med_r - 0.01 * g.hT, g.y_apex - 0.05 * g.Lh,
                                                  g.cx + g.med_l + g.knob_r, g.y_ht + 0.05 * g.Lh))


def _meniscus(g: _Chest, u, s, severity: str):
    """y of the effusion's upper surface: low medially, rising laterally along the chest wall."""
    lv_med, lv_lat = {"small": (1.04, 0.90), "moderate": (0.86, 0.64), "large": (0.58, 0.30)}.get(
        severity, (0.86, 0.64))
    base = g.dome[s] - g.y_apex
    uu = np.clip(u, 0, 1)
    return g.y_apex + base * (lv_med + (lv_lat - lv_med) * uu ** 2.2)


def _f_effusion(ctx, g, i, f):
    X, Y = ctx.X, ctx.Y
    total = np.zeros_like(X)
    for s in _sides(f):
        u = g.u(X, s)
        ym = _meniscus(g, u, s, f.severity)
        # layering fluid: thin at its upper edge (hazy meniscus), full density lower down
        fluid = np.clip((Y - ym) / (0.07 * g.Lh), 0, 1) ** 0.7 * ctx.inside[s]
        total = np.maximum(total, fluid)
    ctx.air_scale *= 1 - F32(0.96) * total
    ctx.mark_vis *= 1 - total
    ctx.add += F32(0.02) * total
    mask = total > 0.5
    s0 = _sides(f)[0]
    ctx.region(i, f.kind, mask, g.lung_box(s0), with_rle=True)


# pneumothorax: the collapsed lung's size relative to the full lung (toward a pivot at the lower hilum), and how much
# darker than aerated lung the air gap is
PTX_SCALE = {"small": 0.8, "moderate": 0.7, "large": 0.55}
PTX_AIR = 0.8


def _f_pneumothorax(ctx, g, i, f):
    X, Y = ctx.X, ctx.Y
    scale = PTX_SCALE.get(f.severity, PTX_SCALE["moderate"])
    total = np.zeros_like(X)
    for s in _sides(f):
        # the lung collapses toward a pivot at the lower hilum: the gap is widest at the apex and laterally
        px, py = g.to_xy(0.3, 0.9, s)
        Xs, Ys = px + (X - px) / scale, py + (Y - py) / scale
        sd_in = g.lung_sd(Xs, Ys, s) * scale
        collapsed = _soft(sd_in, g.edge)
        gapm = np.clip(ctx.lung[s] - collapsed, 0, 1)
        line = np.exp(-((sd_in / max(0.7, 0.9 * ctx.sc)) ** 2)) * ctx.lung[s] * (Y < py)
        ctx.air_scale *= 1 + F32(PTX_AIR) * gapm + F32(-0.15 * (1 - scale)) * collapsed
        ctx.mark_vis *= 1 - gapm
        ctx.add += F32(0.085) * line.astype(F32)
        total = np.maximum(total, gapm)
    ctx.region(i, f.kind, total > 0.5, g.lung_box(_sides(f)[0]), with_rle=True)


# lobe -> (u, v) centre of its projection on a frontal view and radius scale
_LOBE_UV = {"upper": (0.55, 0.24, 1.0), "middle": (0.42, 0.74, 0.8), "lower": (0.68, 0.84, 1.0),
            "lingula": (0.70, 0.66, 0.8)}


def _lobe_of(f: Finding, s: int) -> str:
    loc = f.location if f.location in _LOBE_UV else "lower"
    if loc == "middle" and s == LEFT:
        return "lingula"
    if loc == "lingula" and s == RIGHT:
        return "middle"
    return loc


def _lobe_centre(g: _Chest, lobe: str, s: int, rng: np.random.Generator | None = None):
    u, v, r = _LOBE_UV[lobe]
    if lobe == "lingula":
        u = max(u, g.MLD / g.hT + 0.14)
    if lobe == "middle":
        u = g.MRD / g.hT + 0.14
    if rng is not None:
        u += rng.uniform(-0.08, 0.08)
        v += rng.uniform(-0.05, 0.05)
    u = min(u, 0.86)
    return u, v, r


def _f_consolidation(ctx, g, i, f):
    X, Y = ctx.X, ctx.Y
    frng, lrng = ctx.finding_rng(i, f), ctx.layout_rng(f)
    size, amp = {"mild": (0.17, 0.6), "moderate": (0.24, 0.8), "severe": (0.32, 0.95)}.get(f.severity, (0.24, 0.8))
    total = np.zeros_like(X)
    # fluffy airspace opacity: coarse and fine random fields modulate a lobe-shaped envelope
    patch = (_smooth_noise(frng, ctx.H, ctx.W, 10 if f.kind == "consolidation" else 14)
             + 0.6 * _smooth_noise(frng, ctx.H, ctx.W, 32))
    for s in _sides(f):
        lobe = _lobe_of(f, s)
        u0, v0, rs = _lobe_centre(g, lobe, s, lrng)
        cxp, cyp = g.to_xy(u0, v0, s)
        rx, ry = size * rs * g.hT * 1.15, size * rs * g.Lh * 0.8
        r2 = ((X - cxp) / rx) ** 2 + ((Y - cyp) / ry) ** 2
        op = np.clip((1.1 - r2) * 1.4 + 0.45 * patch, 0, 1) * ctx.inside[s]
        if s == RIGHT and lobe in ("upper", "middle"):
            # the minor fissure (horizontal, at the right hilum) gives the opacity one sharp straight edge
            fis = g.hila[RIGHT][1] + 0.02 * g.Lh
            op = op * np.clip(((fis - Y) if lobe == "upper" else (Y - fis)) / max(1.0, ctx.sc) + 0.5, 0, 1)
        total = np.maximum(total, op * amp)
        # air bronchograms: lucent branching tubes inside the dense part
        br = ctx.canvas()
        hx, hy = g.hila[s]
        for b in range(3):
            tx = cxp + s * frng.uniform(-0.3, 0.5) * rx
            ty = cyp + frng.uniform(-0.5, 0.5) * ry
            bx, by = _curve([hx + (tx - hx) * 0.4, (hx + tx) / 2 + frng.normal(0, 0.1) * rx, tx],
                            [hy + (ty - hy) * 0.4, (hy + ty) / 2, ty], 10)
            br.line(bx, by, max(1.0, 0.35 * g.pcx), 1.0)
        brn = _blurred([(br, 1.0)], 0.6 * ctx.sc)
        ctx.add -= F32(0.1) * brn * np.clip(op * amp - 0.45, 0, 1) * 2
    ctx.air_scale *= 1 - F32(0.9) * total
    ctx.add += F32(0.05) * total
    ctx.mark_vis *= 1 - F32(0.6) * total
    ctx.region(i, f.kind, total > 0.25, g.lung_box(_sides(f)[0]), with_rle=True)


def _f_atelectasis(ctx, g, i, f):
    X = ctx.X
    frng = ctx.finding_rng(i, f)
    total = np.zeros_like(X)
    amp = 0.8 if f.severity in ("mild", "small") else 1.0
    for s in _sides(f):
        if f.location == "lobar":
            # lower lobe collapse: dense triangle from the hilum down to the medial base
            hx, hy = g.hila[s]
            bx0, by0 = g.to_xy(g.medial(g.dome[s], s) / g.hT * 0.9, 1.05, s)
            bx1, by1 = g.to_xy(0.85, 1.08, s)
            tri = ctx.canvas()
            tri.polygon(np.array([hx + s * 0.02 * g.hT, bx0, bx1]), np.array([hy + 0.05 * g.Lh, by0, by1]), 1.0)
            wedge = _blurred([(tri, 1.0)], 2.0 * ctx.sc)
            m = wedge * ctx.inside[s]
            # the wedge also shows through the heart (retrocardiac density)
            wedge_all = wedge * ctx.body
            ctx.add += F32(0.07 * amp) * wedge_all
            total = np.maximum(total, m * amp)
        else:
            # plate-like (discoid) atelectasis: a few thin near-horizontal bands in the lower zone
            cv = ctx.canvas()
            for b in range(3 if amp == 1.0 else 2):
                u0 = frng.uniform(0.3, 0.5)
                u1 = u0 + frng.uniform(0.3, 0.45)
                v = frng.uniform(0.72, 0.9)
                tilt = frng.uniform(-0.03, 0.05)
                xs, ys = g.to_xy(np.array([u0, (u0 + u1) / 2, u1]), np.array([v, v + tilt / 2 + 0.005, v + tilt]), s)
                cv.line(xs, ys, max(1.0, 0.45 * g.pcx), 1.0)
            m = _blurred([(cv, 1.0)], 0.8 * ctx.sc) * ctx.inside[s]
            total = np.maximum(total, m * amp)
    ctx.air_scale *= 1 - F32(0.7) * total
    ctx.add += F32(0.03) * total
    ctx.mark_vis *= 1 - F32(0.5) * total
    mask = total > 0.3
    ctx.region(i, f.kind, ndimage.binary_dilation(mask, iterations=2) if mask.any() else mask,
               g.lung_box(_sides(f)[0]), with_rle=True)


def _f_edema(ctx, g, i, f):
    X, Y = ctx.X, ctx.Y
    frng = ctx.finding_rng(i, f)
    amp = {"mild": 0.35, "moderate": 0.6, "severe": 0.85}.get(f.severity, 0.6)
    patch = _smooth_noise(frng, ctx.H, ctx.W, 12)
    total = np.zeros_like(X)
    kerley = ctx.canvas()
    for s in (RIGHT, LEFT):
        hx, hy = g.hila[s]
        # butterfly: perihilar, fading toward the periphery and the apices
        r2 = ((X - hx - s * 0.12 * g.hT) / (0.55 * g.hT)) ** 2 + ((Y - hy - 0.06 * g.Lh) / (0.42 * g.Lh)) ** 2
        haze = np.exp(-r2 * (1.6 - 0.5 * amp)) * (1 + 0.35 * amp * patch)
        total = np.maximum(total, np.clip(haze, 0, 1) * ctx.inside[s])
        # Kerley B lines: short horizontal lines perpendicular to the lateral pleura at the bases
        for k in range(int(4 + 6 * amp)):
            v = frng.uniform(0.62, 0.92)
            u1 = g.wall_hw(g.y_apex + v * g.Lh, s) / g.hT
            ln = frng.uniform(1.0, 2.0) * g.pcx / g.hT
            xs, ys = g.to_xy(np.array([u1 - ln, u1]), np.array([v, v]), s)
            kerley.line(xs, ys, max(1.0, 0.12 * g.pcx), 1.0)
    kb = _blurred([(kerley, 1.0)], 0.5 * ctx.sc) * ctx.lung_total
    op = total * amp
    ctx.air_scale *= 1 - F32(0.55) * op
    ctx.add += F32(0.05) * op + F32(0.07 * (0.5 + amp)) * kb
    ctx.vessel_blur = max(ctx.vessel_blur, 0.4 + 0.5 * amp)
    ctx.region(i, f.kind, (op > 0.18) | (kb > 0.3), (g.cx - g.hT, g.y_apex, g.cx + g.hT, g.dome[LEFT]),
               with_rle=True)


def _f_lesion(ctx, g, i, f):
    X, Y = ctx.X, ctx.Y
    lrng = ctx.layout_rng(f)
    s = _sides(f)[0]
    lobe = _lobe_of(f, s)
    u0, v0, _ = _lobe_centre(g, lobe, s, lrng)
    if f.kind == "nodule":
        d_cm = {"small": 1.1, "moderate": 1.7, "large": 2.3}.get(f.severity, 1.3) * lrng.uniform(0.85, 1.15)
        lobes = [(0.0, 0.0, 1.0)]
        amp = 0.15
    else:
        d_cm = {"small": 3.6, "moderate": 4.8, "large": 6.0}.get(f.severity, 5.0) * lrng.uniform(0.9, 1.1)
        lobes = [(0.0, 0.0, 1.0)] + [(lrng.normal(0, 0.28), lrng.normal(0, 0.28), lrng.uniform(0.5, 0.75))
                                     for _ in range(3)]
        amp = 0.2
    r = 0.5 * d_cm * g.pcx
    # keep the lesion inside its lung, clear of the chest wall and of the heart / mediastinal border
    cxp, cyp = g.to_xy(u0, v0, s)
    cyp = float(np.clip(cyp, g.y_apex + 0.12 * g.Lh + 1.5 * r, g.dome[s] - 0.04 * g.Lh - 1.5 * r))
    lo = (g.medial(cyp, s) + 1.6 * r + 0.04 * g.hT) / g.hT
    hi = (g.wall_hw(cyp, s) - 1.6 * r - 0.04 * g.hT) / g.hT
    cxp = g.cx + s * g.hT * float(np.clip(u0, lo, max(lo, hi)))
    w = ctx.window(cxp - 2.2 * r, cyp - 2.2 * r, cxp + 2.2 * r, cyp + 2.2 * r)
    Xw, Yw = X[w], Y[w]
    shape = np.zeros_like(Xw)
    for du, dv, rr in lobes:
        d = np.sqrt((Xw - cxp - du * 2 * r) ** 2 + (Yw - cyp - dv * 2 * r) ** 2) / (rr * r)
        shape = np.maximum(shape, np.sqrt(np.clip(1 - d ** 2, 0, 1)) ** 0.7 * _soft(d - 1, 0.8 / (rr * r) + 0.05))
    ctx.add[w] += F32(amp) * shape
    ctx.air_scale[w] *= 1 - F32(0.45) * shape
    mask = np.zeros(X.shape, bool)
    mask[w] = shape > 0.1
    ctx.region(i, f.kind, mask, (cxp - r, cyp - r, cxp + r, cyp + r))


def _f_rib_fracture(ctx, g, i, f):
    pass  # drawn with the ribs; the region is stored there


def _f_pleural_thickening(ctx, g, i, f):
    X, Y = ctx.X, ctx.Y
    total = np.zeros_like(X)
    th = 0.9 * g.pcx
    for s in _sides(f):
        sd = ctx.lung_sd[s]
        V = (Y - g.y_apex) / g.Lh
        u = g.u(X, s)
        if f.location == "apical":
            band = _soft(-sd - th * (1.4 - 1.2 * np.clip(V / 0.12, 0, 1)), g.edge) * ctx.inside[s] * (V < 0.16)
        else:
            taper = np.clip(np.sin(np.clip((V - 0.3) / 0.55, 0, 1) * math.pi), 0, 1)
            band = _soft(-sd - th * 1.3 * taper, g.edge) * ctx.inside[s] * (u > 0.65) * (taper > 0.05)
        total = np.maximum(total, band)
    ctx.air_scale *= 1 - F32(0.85) * total
    ctx.add += F32(0.04) * total
    ctx.mark_vis *= 1 - total
    ctx.region(i, f.kind, total > 0.4, g.lung_box(_sides(f)[0]))


# devices: paths in canonical pixels


def _device_canvas(ctx: _Ctx, i: int, f: Finding, draw) -> None:
    cv = ctx.canvas()
    draw(cv)
    a = _blurred([(cv, 1.0)], 0.55 * ctx.sc)
    ctx.add += a
    ctx.region(i, f.kind, a > 0.01, (0, 0, ctx.W, ctx.H))


def _tube(cv: _Canvas, xs, ys, width: float, stripe: float, wall: float = 0.22, stripe_v: float = 0.6) -> None:
    """A radiolucent-walled tube with a radiopaque stripe: two faint walls and one bright line."""
    cv.line(xs, ys, width, wall)
    cv.line(xs, ys, max(1.0, width - 2.0), wall * 0.45)
    dx = np.gradient(xs)
    dy = np.gradient(ys)
    n = np.hypot(dx, dy) + 1e-9
    off = 0.25 * width
    cv.line(xs - dy / n * off, ys + dx / n * off, stripe, stripe_v)


def _f_et_tube(ctx, g, i, f):
    cyr = g.carina[1]
    tip = cyr - 5.0 * g.pcy * ctx.layout_rng(f).uniform(0.8, 1.2)

    def draw(cv):
        xs, ys = _curve([g.cx + 0.01 * g.hT, g.cx + 0.004 * g.hT, g.cx - 0.012 * g.hT],
                        [-0.02 * ctx.H, (tip - 0.02 * ctx.H) / 2, tip])
        _tube(cv, xs, ys, 0.75 * g.pcx, max(1.0, 0.16 * g.pcx))
    ctx.landmarks["et_tip"] = ctx.frame.point(g.cx - 0.012 * g.hT, tip)
    _device_canvas(ctx, i, f, draw)


def _f_ng_tube(ctx, g, i, f):
    gx, gy = ctx.bubble

    def draw(cv):
        xs, ys = _curve([g.cx + 0.03 * g.hT, g.cx + 0.04 * g.hT, g.cx + 0.06 * g.hT, g.cx + 0.14 * g.hT,
                         gx + 0.05 * g.hT, gx + 0.18 * g.hT],
                        [-0.02 * ctx.H, g.carina[1], g.dome[LEFT] - 0.1 * g.Lh, g.dome[LEFT] + 0.03 * g.Lh,
                         gy + 0.02 * g.Lh, gy + 0.1 * g.Lh])
        _tube(cv, xs, ys, max(1.0, 0.45 * g.pcx), max(1.0, 0.15 * g.pcx), wall=0.3, stripe_v=0.6)
    ctx.landmarks["ng_tip"] = ctx.frame.point(gx + 0.18 * g.hT, gy + 0.1 * g.Lh)
    _device_canvas(ctx, i, f, draw)


def _svc_tip(g: _Chest):
    return g.cx - g.med_r * 0.75, g.carina[1] + 0.06 * g.Lh


def _f_central_line(ctx, g, i, f):
    s = _sides(f)[0]
    tx, ty = _svc_tip(g)
    subclavian = ctx.layout_rng(f).random() < 0.4

    def draw(cv):
        if subclavian:  # enters below the clavicle's midpoint, runs medially, then down the SVC
            px = [g.cx + s * 0.75 * g.hT, g.cx + s * 0.45 * g.hT, g.cx + s * 0.2 * g.hT,
                  g.cx - 0.03 * g.hT if s == LEFT else g.cx - 0.14 * g.hT, tx]
            py = [g.y_apex + 0.1 * g.Lh, g.y_apex + 0.1 * g.Lh, g.y_apex + 0.14 * g.Lh, g.y_apex + 0.2 * g.Lh, ty]
        else:  # internal jugular: down the neck, then into the SVC (crossing the midline from the left)
            px = [g.cx + s * 0.26 * g.hT, g.cx + s * 0.22 * g.hT, g.cx + s * 0.12 * g.hT if s == LEFT else
                  g.cx - 0.15 * g.hT, tx]
            py = [-0.02 * ctx.H, g.y_apex + 0.02 * g.Lh, g.y_apex + 0.16 * g.Lh, ty]
        xs, ys = _curve(px, py)
        cv.line(xs, ys, max(1.0, 0.28 * g.pcx), 0.55)
    ctx.landmarks["line_tip"] = ctx.frame.point(tx, ty)
    _device_canvas(ctx, i, f, draw)


def _f_picc(ctx, g, i, f):
    s = _sides(f)[0]
    tx, ty = _svc_tip(g)

    def draw(cv):
        # basilic vein from the arm, up through the axilla, under the clavicle, brachiocephalic vein, SVC
        px = [g.cx + s * (g.hT + g.wall + 0.1 * ctx.W), g.cx + s * (g.hT + 0.02 * ctx.W), g.cx + s * 0.62 * g.hT,
              g.cx + s * 0.25 * g.hT, g.cx - 0.02 * g.hT if s == LEFT else g.cx - 0.12 * g.hT, tx]
        py = [g.y_apex + 0.4 * g.Lh, g.y_apex + 0.1 * g.Lh, g.y_apex + 0.08 * g.Lh, g.y_apex + 0.13 * g.Lh,
              g.y_apex + 0.19 * g.Lh, ty]
        xs, ys = _curve(px, py)
        cv.line(xs, ys, max(1.0, 0.22 * g.pcx), 0.5)
    ctx.landmarks["picc_tip"] = ctx.frame.point(tx, ty)
    _device_canvas(ctx, i, f, draw)


def _f_pacemaker(ctx, g, i, f):
    s = _sides(f)[0]
    gx, gy = g.cx + s * 0.6 * g.hT, g.y_apex + 0.15 * g.Lh
    ra = (g.cx - 0.55 * g.MRD, g.y_ht + 0.5 * (g.y_hb - g.y_ht))
    rv = (g.cx + 0.45 * g.MLD, g.y_ht + 0.85 * (g.y_hb - g.y_ht))
    tx, ty = _svc_tip(g)

    def draw(cv):
        w, h = 2.4 * g.pcx, 2.0 * g.pcy
        tt = np.linspace(0, 2 * math.pi, 40)
        # rounded-rectangle generator (superellipse), the battery a little less dense, a header on top
        ex = np.sign(np.cos(tt)) * np.abs(np.cos(tt)) ** 0.4
        ey = np.sign(np.sin(tt)) * np.abs(np.sin(tt)) ** 0.4
        cv.polygon(gx + w * ex, gy + h * ey, 0.95)
        cv.polygon(gx + 0.7 * w * ex, gy + 0.25 * h + 0.5 * h * ey, 0.8)
        cv.polygon(gx + 0.5 * w * ex, gy - 1.1 * h + 0.3 * h * ey, 0.6)
        # leads: subclavian vein under the clavicle, brachiocephalic, SVC, then right atrium / right ventricle
        head = [gx - s * 0.3 * w, g.cx + s * 0.4 * g.hT, g.cx + s * 0.18 * g.hT,
                g.cx - 0.04 * g.hT if s == LEFT else g.cx - 0.15 * g.hT, tx]
        headv = [gy - 1.2 * h, g.y_apex + 0.09 * g.Lh, g.y_apex + 0.14 * g.Lh, g.y_apex + 0.2 * g.Lh, ty]
        for tgt, mid in ((ra, (ra[0] - 0.02 * g.hT, ra[1] - 0.08 * g.Lh)),
                         (rv, (g.cx - 0.2 * g.MRD, ra[1] + 0.06 * g.Lh))):
            xs, ys = _curve(head + [mid[0], tgt[0]], headv + [mid[1], tgt[1]])
            cv.line(xs, ys, max(1.0, 0.2 * g.pcx), 0.55)
            cv.line(xs[-4:], ys[-4:], max(2.0, 0.45 * g.pcx), 0.7)  # electrode tip
    ctx.landmarks["pacemaker_generator"] = ctx.frame.point(gx, gy)
    _device_canvas(ctx, i, f, draw)


_FRONTAL_PAINTERS = {
    "cardiomegaly": _f_cardiomegaly, "enlarged_cardiomediastinum": _f_mediastinum, "effusion": _f_effusion,
    "pneumothorax": _f_pneumothorax, "consolidation": _f_consolidation, "pneumonia": _f_consolidation,
    "atelectasis": _f_atelectasis, "edema": _f_edema, "nodule": _f_lesion, "mass": _f_lesion,
    "rib_fracture": _f_rib_fracture, "pleural_thickening": _f_pleural_thickening, "et_tube": _f_et_tube,
    "ng_tube": _f_ng_tube, "central_line": _f_central_line, "picc": _f_picc, "pacemaker": _f_pacemaker,
}


def _landmarks_frontal(ctx: _Ctx, g: _Chest) -> None:
    fr = ctx.frame
    lm = ctx.landmarks
    lm["view"] = ctx.view
    lm["ctr"] = round((g.MRD + g.MLD) / (2 * g.hT), 5)
    lm["heart_box"] = list(fr.box(*g.heart_rect()))
    lm["thorax_box"] = list(fr.box(g.cx - g.hT, g.y_apex, g.cx + g.hT, max(g.cp.values())))
    lm["lung_right_box"] = list(fr.box(*g.lung_box(RIGHT)))
    lm["lung_left_box"] = list(fr.box(*g.lung_box(LEFT)))
    up = 0.45
    lm["dome_y_right"] = fr.point(g.cx - up * g.hT, g.dome[RIGHT])[1]
    lm["dome_y_left"] = fr.point(g.cx + up * g.hT, g.dome[LEFT])[1]
    lm["dome_right"] = fr.point(g.cx - up * g.hT, g.dome[RIGHT])
    lm["dome_left"] = fr.point(g.cx + up * g.hT, g.dome[LEFT])
    lm["cp_angle_right"] = fr.point(g.cx - g.hT, g.cp[RIGHT])
    lm["cp_angle_left"] = fr.point(g.cx + g.hT, g.cp[LEFT])
    lm["carina"] = fr.point(*g.carina)
    lm["hilum_right"] = fr.point(*g.hila[RIGHT])
    lm["hilum_left"] = fr.point(*g.hila[LEFT])
    lm["aortic_knob"] = fr.point(g.cx + g.med_l + 0.4 * g.knob_r, g.knob_y)
    lm["gastric_bubble"] = fr.point(*ctx.bubble)
    lm["midline_top"] = fr.point(g.cx, g.y_apex)
    lm["midline_bottom"] = fr.point(g.cx, g.dome[RIGHT])
    lm["mediastinum_width"] = round((g.med_r + g.med_l + 0.55 * g.knob_r) / (2 * g.hT), 5)
    lm["px_per_cm"] = round(g.pcx, 4)


# ----------------------------------------------------------------------------------------------------------------
# lateral view (patient facing the viewer's left: anterior on the image left, spine on the right)


@dataclass
class _Side:
    """Canonical lateral geometry (pixels)."""

    W: int
    H: int
    xa: float  # anterior inner thoracic margin (behind the sternum) at mid height
    xp: float  # posterior inner margin (posterior ribs)
    Lh: float
    y_apex: float
    dome: float  # top of the right hemidiaphragm
    dome_l: float  # top of the left hemidiaphragm (lower)
    heart: tuple  # (cx, cy, a, b, theta): ellipse, long axis tilted up-posteriorly by theta
    carina: tuple
    hilum: tuple
    pc: float  # px per cm
    wall_a: float  # anterior chest wall thickness
    wall_p: float  # posterior (back) thickness
    edge: float

    def __post_init__(self) -> None:
        lo, hi = -0.5 * self.H, 1.5 * self.H
        self._ant = _Lut(self._x_ant, lo, hi)
        self._post = _Lut(self._x_post, lo, hi)
        xlo, xhi = -0.5 * self.W, 1.5 * self.W
        self._top = _Lut(self._y_top, xlo, xhi)
        self._dome = {False: _Lut(lambda x: self._dome_y(x, False), xlo, xhi),
                      True: _Lut(lambda x: self._dome_y(x, True), xlo, xhi)}

    @property
    def depth(self):
        return self.xp - self.xa

    def xn(self, X):
        """0 at the anterior margin, 1 at the posterior margin."""
        return (X - self.xa) / self.depth

    def _x_ant(self, Y):
        v = (Y - self.y_apex) / self.Lh
        # the sternum is nearly straight; the thoracic inlet slopes back above it
        return self.xa + self.depth * (0.16 * np.clip((0.22 - v) / 0.22, 0, None) ** 1.5 + 0.02 * (v - 0.5) ** 2)

    def _x_post(self, Y):
        v = (Y - self.y_apex) / self.Lh
        return self.xp + self.depth * (0.025 * np.sin(np.clip(v, 0, 1.2) * math.pi / 1.2)
                                       - 0.08 * np.clip((0.15 - v) / 0.15, 0, None) ** 1.5)

    def _y_top(self, X):
        xn = self.xn(X)
        return self.y_apex + self.Lh * np.where(xn < 0.6, 0.3 * ((0.6 - xn) / 0.6) ** 2,
                                                0.08 * ((xn - 0.6) / 0.4) ** 2)

    def _dome_y(self, X, left: bool):
        """Hemidiaphragm: gentle anterior slope, peak at 38 % depth, steep fall into the posterior sulcus."""
        xn = self.xn(X)
        d0 = self.dome_l if left else self.dome
        front = d0 + 0.06 * self.Lh * (np.clip(0.38 - xn, 0, None) / 0.38) ** 2
        back = d0 + 0.2 * self.Lh * (np.clip(xn - 0.38, 0, None) / 0.62) ** 2.2
        return np.where(xn < 0.38, front, back)

    def dome_y(self, X, left: bool = False):
        return self._dome[left](X)

    def lung_sd(self, X, Y, left: bool = False):
        """Approximate signed distance (px, negative inside) to the lung bounded by the right (or left) dome."""
        d = np.maximum(self._ant(Y) - X, X - self._post(Y))
        d = np.maximum(d, self._top(X) - Y)
        return np.maximum(d, Y - self.dome_y(X, left))

    def heart_sd(self, X, Y):
        hx, hy, a, b, th = self.heart
        c, s = math.cos(th), math.sin(th)
        dx, dy = X - hx, Y - hy
        p, q = (dx * c - dy * s) / a, (dx * s + dy * c) / b
        r = np.sqrt(p * p + q * q)
        return (r - 1) * min(a, b)

    def heart_extent(self):
        hx, hy, a, b, th = self.heart
        c, s = math.cos(th), math.sin(th)
        ex, ey = math.hypot(a * c, b * s), math.hypot(a * s, b * c)
        return hx - ex, hy - ey, hx + ex, hy + ey


def _side_geometry(ctx: _Ctx) -> _Side:
    a, pose, W, H = ctx.anatomy, ctx.pose, ctx.W, ctx.H
    depth = (0.5 + 0.5 * (a.thorax_width - 0.6)) * W
    xa = 0.47 * W - 0.5 * depth
    Lh = float(min(a.lung_height * H * (1 + 0.03 * (pose.inspiration - 9.5)) * 1.02, 0.72 * H))
    y_apex = 0.44 * H - 0.5 * Lh
    dome = y_apex + Lh
    for f in ctx.findings:
        if f.kind == "atelectasis" and f.location == "lobar":
            dome -= 0.03 * Lh
    pc = depth / 22.0
    k = (ctx.ctr / 0.44) ** 0.85
    ha, hb, th = 0.3 * depth * k, 0.21 * depth * k ** 0.9, math.radians(35)
    ex = math.hypot(ha * math.cos(th), hb * math.sin(th))
    heart = (xa + 0.02 * depth + ex, dome - 0.07 * Lh, ha, hb, th)
    return _Side(W=W, H=H, xa=xa, xp=xa + depth, Lh=Lh, y_apex=y_apex, dome=dome, dome_l=dome + 0.045 * Lh,
                 heart=heart, carina=(xa + 0.56 * depth, y_apex + 0.32 * Lh),
                 hilum=(xa + 0.54 * depth, y_apex + 0.43 * Lh), pc=pc, wall_a=pc * (2.0 + 3.0 * a.soft_tissue),
                 wall_p=pc * (4.5 + 3.0 * a.soft_tissue), edge=max(0.9, 1.5 * ctx.sc))


def _paint_lateral(ctx: _Ctx) -> None:
    sg = _side_geometry(ctx)
    ctx.sg = sg
    X, Y, sc, a = ctx.X, ctx.Y, ctx.sc, ctx.anatomy
    V = (Y - sg.y_apex) / sg.Lh
    # body: chest wall in front, back behind; shoulders and neck fill the top; breasts add in front (F)
    front = sg._ant(Y) - sg.wall_a - 0.03 * sg.depth * np.clip(V - 0.9, 0, None)
    if a.sex == "F":
        front = front - sg.pc * (2 + 3 * a.soft_tissue) * np.exp(-(((V - 0.62) / 0.16) ** 2))
    back = sg._post(Y) + sg.wall_p
    body = _soft(np.maximum(front - X, X - back), 1.4 * sc)
    mid, half = (sg.xa + sg.xp) / 2, 0.5 * sg.depth + 0.5 * (sg.wall_a + sg.wall_p)
    prof = np.sqrt(np.clip(1 - ((X - mid) / (1.08 * half)) ** 2, 0, 1))
    below = _smoothstep(Y, sg.dome, sg.dome + 0.25 * sg.Lh)
    shoulders = np.exp(-(((Y - sg.y_apex + 0.05 * sg.Lh) / (0.25 * sg.Lh)) ** 2)) * _soft(-X + sg.xa, 3 * sc)
    tissue = (F32(0.76 + 0.04 * a.soft_tissue) * prof ** 0.35 + F32(0.04) * below + F32(0.05) * shoulders) * body
    ctx.body = body
    lowfreq = _smooth_noise(ctx.jit_rng, ctx.H, ctx.W, 4)
    tissue = tissue + F32(0.015) * lowfreq * body

    lung_sd = sg.lung_sd(X, Y)
    lung_r = _soft(lung_sd, sg.edge)
    lung_l = _soft(sg.lung_sd(X, Y, True), sg.edge)
    heart = _soft(sg.heart_sd(X, Y), sg.edge)
    ctx.heart = heart
    ctx.lung_sd, ctx.lung_total = lung_sd, lung_l
    ctx.lung = {RIGHT: lung_r, LEFT: lung_l}
    ctx.inside = {s: np.clip(2 * m, 0, 1) for s, m in ctx.lung.items()}
    ctx.air_scale = np.ones_like(X)
    ctx.mark_vis = np.ones_like(X)
    ctx.add = np.zeros_like(X)
    ctx.vessel_blur = 0.0
    ctx.aorta_scale = 1.0
    for i, f in enumerate(ctx.findings):
        _lateral_finding(ctx, sg, i, f)

    # great vessels: ascending aorta, arch over the trachea, descending aorta in front of the spine
    hx, hy, ha, _, th = sg.heart
    ves = ctx.canvas()
    top = (hx + 0.55 * ha * math.cos(th), hy - 0.55 * ha * math.sin(th))
    ao_x, ao_y = _curve([top[0] - 0.05 * sg.depth, sg.xa + 0.3 * sg.depth, sg.xa + 0.5 * sg.depth,
                         sg.xa + 0.68 * sg.depth, sg.xa + 0.72 * sg.depth, sg.xa + 0.74 * sg.depth],
                        [top[1], sg.y_apex + 0.26 * sg.Lh, sg.y_apex + 0.15 * sg.Lh, sg.y_apex + 0.24 * sg.Lh,
                         sg.y_apex + 0.55 * sg.Lh, sg.dome + 0.05 * sg.Lh])
    ves.line(ao_x, ao_y, 2.3 * sg.pc * ctx.aorta_scale, 1.0)
    aorta = _blurred([(ves, 1.0)], 2.0 * sc)
    # two overlapping lungs: both above the right dome, only the left one between the domes
    lung_eff = (F32(0.55) * lung_r + F32(0.45) * lung_l) * (1 - F32(0.6) * heart) * (1 - F32(0.2) * aorta)
    rim = np.exp(np.minimum(lung_sd, 0) * F32(1.0 / (2.0 * sg.pc)))
    lung_level = F32(0.4 + 0.04 * a.soft_tissue) + F32(0.05) * (1 - np.clip(V * 3, 0, 1)) + F32(0.06) * rim
    air = lung_eff * ctx.air_scale
    ctx.D += tissue + air * (lung_level - tissue)
    # trachea: air column from the neck to the carina, leaning back
    tr = ctx.canvas()
    tx, ty = _curve([sg.xa + 0.4 * sg.depth, sg.xa + 0.47 * sg.depth, sg.carina[0]],
                    [-0.02 * ctx.H, sg.y_apex + 0.1 * sg.Lh, sg.carina[1]])
    tr.line(tx, ty, 1.8 * sg.pc, 1.0)
    ctx.D -= F32(0.12) * _blurred([(tr, 1.0)], 1.0 * sc)
    # hilum and vessels radiating from it
    r2 = ((X - sg.hilum[0]) / (0.09 * sg.depth)) ** 2 + ((Y - sg.hilum[1]) / (0.07 * sg.Lh)) ** 2
    ctx.D += F32(0.06) * np.exp(-r2).astype(F32)
    cv = ctx.canvas()
    rng = np.random.default_rng([ctx.patient, 11])
    for base in range(0, 360, 30):
        stack = [(sg.hilum[0], sg.hilum[1], math.radians(base + rng.normal(0, 8)), 2.2 * sg.pc, 0.6, 0)]
        while stack:
            x, y, ang, ln, w, gen = stack.pop()
            x1, y1 = x + ln * math.cos(ang), y + ln * math.sin(ang)
            cv.line(np.array([x, x1]), np.array([y, y1]), w * sg.pc, 0.09 * min(1, w / 0.6) ** 0.6)
            if gen < 4:
                for sgn in (-1, 1):
                    stack.append((x1, y1, ang + sgn * math.radians(22 + 12 * rng.random()), ln * 0.72, w * 0.64,
                                  gen + 1))
    vessels = _blurred([(cv, 1.0)], 0.9 * sc)
    tex = _lung_texture(ctx)
    ctx.D += (vessels + F32(0.018) * tex) * lung_eff * ctx.mark_vis
    ctx.D += _bones_lateral(ctx, sg, lung_eff)
    # gastric bubble under the left dome, anteriorly
    gx, gy = sg.xa + 0.28 * sg.depth, sg.dome_l + 0.09 * sg.Lh
    r2 = ((X - gx) / (0.1 * sg.depth)) ** 2 + ((Y - gy) / (0.045 * sg.Lh)) ** 2
    ctx.D -= F32(0.16) * (np.clip((1 - r2) * 3, 0, 1) * np.clip((gy - Y) / sc + 0.5, 0, 1)).astype(F32)
    ctx.bubble = (gx, gy)
    ctx.D += ctx.add
    for i, f in enumerate(ctx.findings):
        if f.kind in _DEVICES:
            _lateral_device(ctx, sg, i, f, tx, ty)
    fr, lm = ctx.frame, ctx.landmarks
    lm["view"] = ctx.view
    lm["ctr"] = round(float(ctx.ctr), 5)  # the study's frontal ratio; the lateral heart is scaled with it
    lm["heart_box"] = list(fr.box(*sg.heart_extent()))
    lm["heart_depth_ratio"] = round((sg.heart_extent()[2] - sg.heart_extent()[0]) / sg.depth, 5)
    lm["thorax_box"] = list(fr.box(sg.xa, sg.y_apex, sg.xp, sg.dome + 0.2 * sg.Lh))
    lm["dome_y"] = fr.point(sg.xa + 0.38 * sg.depth, sg.dome)[1]
    lm["dome_y_left"] = fr.point(sg.xa + 0.38 * sg.depth, sg.dome_l)[1]
    lm["posterior_sulcus"] = fr.point(sg.xp, sg.dome + 0.2 * sg.Lh)
    lm["retrosternal_box"] = list(fr.box(sg.xa + 0.02 * sg.depth, sg.y_apex + 0.22 * sg.Lh, sg.xa + 0.22 * sg.depth,
                                         sg.heart_extent()[1]))
    lm["spine_x"] = fr.point(sg.xp - 0.2 * sg.depth, sg.hilum[1])[0]
    lm["sternum_x"] = fr.point(sg.xa - 0.4 * sg.wall_a, sg.hilum[1])[0]
    lm["carina"] = fr.point(*sg.carina)
    lm["hilum"] = fr.point(*sg.hilum)
    lm["gastric_bubble"] = fr.point(gx, gy)
    lm["px_per_cm"] = round(sg.pc, 4)


def _bones_lateral(ctx: _Ctx, sg: _Side, lung_eff: np.ndarray) -> np.ndarray:
    """Spine, sternum, ribs, scapulae and raised humeri of a lateral view, as added density."""
    sc = ctx.sc
    body, outer, inner = ctx.canvas(), ctx.canvas(), ctx.canvas()
    # thoracic spine: vertebral bodies on a kyphotic curve, disc spaces between, posterior elements behind
    hgt = sg.Lh / 10.5
    for k in range(-3, 15):
        yc = sg.y_apex + (k + 0.2) * hgt
        v = (yc - sg.y_apex) / sg.Lh
        xc = sg.xp - 0.24 * sg.depth + 0.05 * sg.depth * math.sin(math.pi * float(np.clip(v, 0, 1.1)) / 1.1)
        hh, ww = 0.4 * hgt * (1 + 0.02 * max(k, 0)), 0.08 * sg.depth
        tilt = 0.05 * sg.depth * math.cos(math.pi * float(np.clip(v, 0, 1.1)) / 1.1) * hh / sg.Lh * 6
        xs = np.array([xc - ww + tilt, xc + ww + tilt, xc + ww - tilt, xc - ww - tilt])
        ys = np.array([yc - hh, yc - hh, yc + hh, yc + hh])
        lum = 0.75 - 0.025 * max(k, 0)  # lower vertebrae project through more lung: darker ("spine sign")
        outer.polygon(xs, ys, lum)
        inner.polygon(xc + 0.8 * (xs - xc), yc + 0.75 * (ys - yc), lum)
        # pedicle and spinous process behind the body
        body.polygon(np.array([xc + ww * 1.05, xc + ww * 2.2, xc + ww * 3.4, xc + ww * 2.2]),
                     np.array([yc - 0.5 * hh, yc - 0.6 * hh, yc + 1.3 * hh, yc + 0.5 * hh]), 0.6)
    # sternum: manubrium and body behind the anterior chest wall
    sx, sy = _curve([sg.xa - 0.25 * sg.wall_a + 0.05 * sg.depth, sg.xa - 0.35 * sg.wall_a,
                     sg.xa - 0.2 * sg.wall_a],
                    [sg.y_apex + 0.1 * sg.Lh, sg.y_apex + 0.4 * sg.Lh, sg.dome - 0.12 * sg.Lh], 16)
    outer.line(sx, sy, 1.4 * sg.pc, 0.9)
    inner.line(sx, sy, 0.8 * sg.pc, 0.9)
    # ribs of both sides, offset by their different magnification, sweeping down and forward
    ribs_o, ribs_i = ctx.canvas(), ctx.canvas()
    for off in (0.0, 0.03):
        for k in range(1, 12):
            y0 = sg.y_apex + (k - 0.7) * sg.Lh / 10.0 + off * sg.Lh
            xs, ys = _curve([sg.xp + 0.02 * sg.depth, sg.xp - 0.2 * sg.depth, sg.xa + 0.45 * sg.depth,
                             sg.xa + 0.1 * sg.depth],
                            [y0, y0 + 0.06 * sg.Lh, y0 + 0.2 * sg.Lh, y0 + 0.36 * sg.Lh], 10)
            ribs_o.line(xs, ys, 0.9 * sg.pc, 1.0)
            ribs_i.line(xs, ys, 0.5 * sg.pc, 1.0)
    # scapulae: oblique bars over the upper posterior chest
    for off in (0.0, 0.05):
        body.line(np.array([sg.xp - (0.02 + off) * sg.depth, sg.xp - (0.22 + off) * sg.depth]),
                  np.array([sg.y_apex - 0.05 * sg.Lh, sg.y_apex + 0.5 * sg.Lh]), 0.9 * sg.pc, 0.5)
    # raised arms: humeri across the top, anterior
    for off in (0.0, 0.05):
        hx, hy = np.array([sg.xa - 0.1 * sg.depth, sg.xa + (0.32 + off) * sg.depth]), \
            np.array([-0.05 * ctx.H, sg.y_apex + (0.02 + off) * sg.Lh])
        outer.line(hx, hy, 2.4 * sg.pc, 0.7)
        inner.line(hx, hy, 1.4 * sg.pc, 0.7)
    out = _blurred([(outer, 0.13), (inner, -0.0585)], 0.8 * sc)
    out += _blurred([(body, 0.07)], 1.0 * sc) * ctx.body
    out += _blurred([(ribs_o, 0.05), (ribs_i, -0.025)], 0.8 * sc) * (F32(0.3) + F32(0.7) * lung_eff)
    return out


def _lateral_xy(sg: _Side, lobe: str, rng: np.random.Generator):
    xn, v = {"upper": (0.5, 0.24), "middle": (0.3, 0.7), "lingula": (0.32, 0.66), "lower": (0.76, 0.86)}[lobe]
    xn += rng.uniform(-0.06, 0.06)
    v += rng.uniform(-0.04, 0.04)
    return sg.xa + xn * sg.depth, sg.y_apex + v * sg.Lh


_DEVICES = ("et_tube", "ng_tube", "central_line", "picc", "pacemaker")


def _lateral_finding(ctx: _Ctx, sg: _Side, i: int, f: Finding) -> None:
    X, Y = ctx.X, ctx.Y
    xn = sg.xn(X)
    lung = ctx.lung_total
    k = f.kind
    fallback = (sg.xa, sg.y_apex, sg.xp, sg.dome + 0.2 * sg.Lh)
    if k == "cardiomegaly":
        ctx.regions[i] = Region(k, ctx.frame.box(*sg.heart_extent()))
    elif k == "enlarged_cardiomediastinum":
        ctx.aorta_scale = {"mild": 1.3, "moderate": 1.5, "severe": 1.7}.get(f.severity, 1.5)
        r2 = ((X - (sg.xa + 0.35 * sg.depth)) / (0.15 * sg.depth)) ** 2 + ((Y - sg.y_apex - 0.24 * sg.Lh)
                                                                           / (0.15 * sg.Lh)) ** 2
        m = np.clip(1 - r2, 0, 1) * lung * (ctx.aorta_scale - 1) * 2
        ctx.air_scale *= 1 - F32(0.6) * np.clip(m, 0, 1)
        ctx.region(i, k, m > 0.2, fallback)
    elif k == "effusion":
        total = np.zeros_like(X)
        lv = {"small": 0.0, "moderate": 0.16, "large": 0.38}.get(f.severity, 0.16)
        for s in _sides(f):
            yb = sg.dome + (0.045 * sg.Lh if s == LEFT else 0.0)
            # fluid fills the posterior sulcus first; the meniscus climbs the posterior wall
            ym = yb + 0.16 * sg.Lh - lv * sg.Lh - (0.1 + 0.8 * lv) * sg.Lh * np.clip(xn, 0, 1) ** 2
            fl = np.clip((Y - ym) / (0.05 * sg.Lh) + 0.2, 0, 1) ** 0.8 * ctx.inside[s]
            total = np.maximum(total, fl)
        ctx.air_scale *= 1 - F32(0.9) * total
        ctx.mark_vis *= 1 - total
        ctx.region(i, k, total > 0.5, fallback, with_rle=True)
    elif k in ("consolidation", "pneumonia"):
        lrng, frng = ctx.layout_rng(f), ctx.finding_rng(i, f)
        cx_, cy_ = _lateral_xy(sg, _lobe_of(f, _sides(f)[0]), lrng)
        size = {"mild": 0.13, "moderate": 0.19, "severe": 0.26}.get(f.severity, 0.19)
        r2 = ((X - cx_) / (size * sg.depth)) ** 2 + ((Y - cy_) / (size * sg.Lh * 0.8)) ** 2
        patch = _smooth_noise(frng, ctx.H, ctx.W, 10) + 0.6 * _smooth_noise(frng, ctx.H, ctx.W, 28)
        m = np.clip((1.1 - r2) * 1.4 + 0.45 * patch, 0, 1) * lung
        ctx.air_scale *= 1 - F32(0.75) * m
        ctx.add += F32(0.03) * m
        ctx.region(i, k, m > 0.25, fallback, with_rle=True)
    elif k in ("nodule", "mass"):
        lrng = ctx.layout_rng(f)
        cx_, cy_ = _lateral_xy(sg, _lobe_of(f, _sides(f)[0]), lrng)
        d = (1.4 if k == "nodule" else 5.0) * sg.pc
        rr = np.sqrt((X - cx_) ** 2 + (Y - cy_) ** 2) / (d / 2)
        m = np.sqrt(np.clip(1 - rr ** 2, 0, 1)) ** 0.7
        ctx.add += F32(0.12 if k == "nodule" else 0.16) * m
        ctx.region(i, k, m > 0.1, (cx_ - d / 2, cy_ - d / 2, cx_ + d / 2, cy_ + d / 2))
    elif k == "edema":
        amp = {"mild": 0.35, "moderate": 0.6, "severe": 0.85}.get(f.severity, 0.6)
        r2 = ((X - sg.hilum[0]) / (0.35 * sg.depth)) ** 2 + ((Y - sg.hilum[1]) / (0.3 * sg.Lh)) ** 2
        m = np.exp(-r2 * 1.3) * lung * amp
        ctx.air_scale *= 1 - F32(0.5) * m
        ctx.region(i, k, m > 0.18, fallback, with_rle=True)
    elif k == "atelectasis":
        frng = ctx.finding_rng(i, f)
        cv = ctx.canvas()
        if f.location == "lobar":  # collapsed lower lobe: a posterior wedge over the lower spine
            cv.polygon(np.array([sg.hilum[0], sg.xp - 0.02 * sg.depth, sg.xa + 0.6 * sg.depth]),
                       np.array([sg.hilum[1], sg.dome + 0.12 * sg.Lh, sg.dome + 0.02 * sg.Lh]), 1.0)
            m = _blurred([(cv, 1.0)], 2 * ctx.sc) * lung
        else:
            for b in range(2):
                x0 = sg.xa + frng.uniform(0.2, 0.4) * sg.depth
                yy = sg.dome - frng.uniform(0.05, 0.15) * sg.Lh
                cv.line(np.array([x0, x0 + 0.35 * sg.depth]), np.array([yy, yy + 0.02 * sg.Lh]),
                        max(1.0, 0.4 * sg.pc), 1.0)
            m = _blurred([(cv, 1.0)], 0.8 * ctx.sc) * lung
        ctx.air_scale *= 1 - F32(0.6) * m
        mask = m > 0.3
        ctx.region(i, k, ndimage.binary_dilation(mask, iterations=2) if mask.any() else mask, fallback,
                   with_rle=True)
    elif k == "pleural_thickening":
        rim = np.clip(lung - _soft(ctx.lung_sd + 0.7 * sg.pc, sg.edge), 0, 1)
        if f.location == "apical":
            m = rim * (Y < sg.y_apex + 0.15 * sg.Lh)
        else:
            m = rim * (xn > 0.8) * (Y > sg.y_apex + 0.3 * sg.Lh) * (Y < sg.dome)
        ctx.air_scale *= 1 - F32(0.8) * m
        ctx.region(i, k, m > 0.4, fallback)
    elif k == "pneumothorax":
        # seen edge-on only at the apex: a lucent cap without markings, bounded by a thin line
        frac = {"small": 0.06, "moderate": 0.12, "large": 0.2}.get(f.severity, 0.12)
        yl = sg._top(X) + frac * sg.Lh
        m = lung * np.clip((yl - Y) / (2 * ctx.sc) + 0.5, 0, 1)
        line = np.exp(-(((Y - yl) / max(0.7, ctx.sc)) ** 2)) * lung
        ctx.air_scale *= 1 + F32(0.25) * m
        ctx.mark_vis *= 1 - m
        ctx.add += F32(0.05) * line
        ctx.region(i, k, m > 0.5, (sg.xa, sg.y_apex, sg.xp, sg.y_apex + frac * sg.Lh), with_rle=True)
    elif k == "rib_fracture":  # not resolvable on the lateral: region = that posterior rib's level
        kk = int(f.location) if (f.location or "").isdigit() else 6
        y0 = sg.y_apex + (kk - 0.7) * sg.Lh / 10.0
        ctx.regions[i] = Region(k, ctx.frame.box(sg.xp - 0.3 * sg.depth, y0 - 0.04 * sg.Lh,
                                                 sg.xp + 0.02 * sg.depth, y0 + 0.12 * sg.Lh))
    elif k not in _DEVICES:
        ctx.regions[i] = Region(k, ctx.frame.box(*fallback))


def _lateral_device(ctx, sg, i, f, tx, ty):
    k = f.kind
    hx, hy, ha, hb, _ = sg.heart
    svc = (sg.xa + 0.4 * sg.depth, sg.y_apex + 0.36 * sg.Lh)

    def draw(cv):
        if k == "et_tube":
            n = int(len(tx) * 0.78)
            _tube(cv, tx[:n], ty[:n], 0.75 * sg.pc, max(1.0, 0.16 * sg.pc))
        elif k == "ng_tube":  # esophagus behind the trachea, through the hiatus, into the fundus
            xs, ys = _curve([sg.xa + 0.5 * sg.depth, sg.xa + 0.6 * sg.depth, sg.xa + 0.64 * sg.depth,
                             sg.xa + 0.5 * sg.depth, ctx.bubble[0]],
                            [-0.02 * ctx.H, sg.carina[1], sg.dome - 0.05 * sg.Lh, sg.dome_l + 0.05 * sg.Lh,
                             ctx.bubble[1] + 0.04 * sg.Lh])
            _tube(cv, xs, ys, max(1.0, 0.45 * sg.pc), max(1.0, 0.15 * sg.pc), wall=0.3)
        elif k in ("central_line", "picc"):
            xs, ys = _curve([sg.xa + 0.26 * sg.depth, sg.xa + 0.34 * sg.depth, svc[0]],
                            [-0.02 * ctx.H, sg.y_apex + 0.1 * sg.Lh, svc[1]])
            cv.line(xs, ys, max(1.0, 0.25 * sg.pc), 0.5)
        else:  # pacemaker: generator edge-on in the anterior chest wall, leads to the right heart
            gx, gy = sg.xa - 0.55 * sg.wall_a, sg.y_apex + 0.12 * sg.Lh
            w, h = 0.5 * sg.pc, 2.2 * sg.pc
            cv.polygon(np.array([gx - w, gx + w, gx + w, gx - w]), np.array([gy - h, gy - h, gy + h, gy + h]), 0.95)
            for tgt in ((hx - 0.1 * ha, hy - 0.55 * hb), (hx - 0.45 * ha, hy + 0.55 * hb)):
                xs, ys = _curve([gx, sg.xa + 0.25 * sg.depth, svc[0], tgt[0]],
                                [gy - h, sg.y_apex + 0.1 * sg.Lh, svc[1], tgt[1]])
                cv.line(xs, ys, max(1.0, 0.2 * sg.pc), 0.55)
    cv = ctx.canvas()
    draw(cv)
    a = _blurred([(cv, 1.0)], 0.55 * ctx.sc)
    ctx.D += a
    ctx.region(i, k, a > 0.01, (0, 0, ctx.W, ctx.H))


# ----------------------------------------------------------------------------------------------------------------
# development: exposure curve, vignetting, noise


def _develop(ctx: _Ctx) -> np.ndarray:
    """Density -> display: S-shaped exposure curve scaled by pose.exposure, vignetting, heel effect, noise."""
    pose, H, W = ctx.pose, ctx.H, ctx.W
    k = F32(1.6 * pose.exposure)
    img = F32(0.5) + F32(0.5) * np.tanh(k * (ctx.D - F32(0.5))) / F32(math.tanh(0.8))
    yy = (np.arange(H, dtype=F32) / F32(H) - F32(0.5))[:, None]
    xx = (np.arange(W, dtype=F32) / F32(W) - F32(0.5))[None, :]
    vign = F32(1) - F32(0.16) * (xx ** 2 + yy ** 2) * F32(2) - F32(0.03) * yy
    img = img * vign
    n = ctx.noise_rng.standard_normal((H, W), dtype=F32)
    n = ndimage.gaussian_filter(n, 0.55 * max(ctx.sc, 0.6), truncate=2.5)
    n *= F32(1.0 / (n.std() + 1e-6))
    img = img + F32(pose.noise) * (F32(0.6) + F32(0.8) * np.clip(img, 0, 1)) * n
    return np.clip(img, 0, 1).astype(F32)
