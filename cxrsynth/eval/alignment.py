"""How well the aligner aligns: the pointing game on the phantom's known finding regions, and heat maps.

A case is one validate image with a ground-truth finding region whose report names the finding: the similarity map of
the finding's words over the token grid (image-based), or the bank's cells for its terms (bank-based), is pointed at
the region when its top-k cells hit the cells the region covers (`region_cells`). `pointing_metrics` compares the hit
rate with a random draw of k cells and with the region's area share.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cxrsynth.keypatches import finding_spans, span_map, terms_of_text

if TYPE_CHECKING:  # type hints only: the code calls the objects' methods, no import edge
    from cxrsynth.models.align import AlignModel
    from cxrsynth.models.align_training import Pairs


# phantom finding kind -> (metric name, pathology names whose words stand for it in a report)
KIND_FINDING: dict[str, tuple[str, tuple[str, ...]]] = {
    "effusion": ("pleural effusion", ("pleural effusion",)),
    "pneumothorax": ("pneumothorax", ("pneumothorax",)),
    "cardiomegaly": ("cardiomegaly", ("cardiomegaly",)),
    "enlarged_cardiomediastinum": ("enlarged cardiomediastinum", ("enlarged cardiomediastinum",)),
    "consolidation": ("consolidation", ("consolidation",)),
    "pneumonia": ("pneumonia", ("pneumonia",)),
    "atelectasis": ("atelectasis", ("atelectasis",)),
    "edema": ("pulmonary edema", ("pulmonary edema",)),
    "nodule": ("lung lesion", ("nodule", "mass", "lesion")),
    "mass": ("lung lesion", ("mass", "nodule", "lesion")),
    "rib_fracture": ("fracture", ("fracture",)),
    "pleural_thickening": ("pleural thickening", ("pleural thickening",)),
    "et_tube": ("endotracheal tube", ("endotracheal tube",)),
    "ng_tube": ("nasogastric tube", ("nasogastric tube",)),
    "central_line": ("central venous catheter", ("central venous catheter",)),
    "picc": ("picc", ("picc",)),
    "pacemaker": ("pacemaker", ("pacemaker",)),
}


REGION_COVER = 0.25  # a grid cell belongs to a region when at least this share of it is covered


def region_canvas(region: dict, rows: int, columns: int, image_size: int, resize: str) -> np.ndarray:
    """A ground-truth region (box or RLE mask, in the DICOM's pixels) on the stored image: float image_size x
    image_size in [0, 1], through ingest's square resize (pad or centre crop)."""
    from PIL import Image

    from cxrsynth.images import place_square
    from cxrsynth.data.phantom.truth import mask_from_rle

    if region.get("mask_rle"):
        mask = mask_from_rle(region["mask_rle"], rows, columns).astype(np.float32)
    else:
        mask = np.zeros((rows, columns), np.float32)
        x0, y0, x1, y1 = (int(v) for v in region["box"])
        mask[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 1.0
    return place_square(mask, image_size, resize, Image.Resampling.BILINEAR)  # ingest's geometry


def region_cells(region: dict, rows: int, columns: int, image_size: int, resize: str,
                 grid: tuple[int, int]) -> np.ndarray:
    """Boolean H x W: the token-grid cells a ground-truth region (box or RLE mask, stored-image pixels) covers by at
    least REGION_COVER, after ingest's square resize (pad or centre crop); at least the best-covered cell."""
    from PIL import Image

    canvas = region_canvas(region, rows, columns, image_size, resize)
    h, w = grid
    cover = np.asarray(Image.fromarray(canvas, mode="F").resize((w, h), Image.Resampling.BOX))
    cells = cover >= REGION_COVER
    if not cells.any() and cover.max() > 0:
        cells.flat[int(np.argmax(cover))] = True
    return cells


def top_positions(m: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The k highest cells of a map (ties: raster order), as (row, col)."""
    flat = np.asarray(m, np.float64).ravel()
    order = np.lexsort((np.arange(flat.size), -flat))[:k]
    return [divmod(int(q), m.shape[1]) for q in order]


@dataclass
class PointingCase:
    """One held-out image and one finding group with a known region, as the pointing game sees it."""

    finding: str
    index: int                       # row in the evaluated pairs
    cells: np.ndarray                # H x W bool
    word_map: np.ndarray | None      # H x W similarity of the finding's words (None: report has no such words,
                                     # or not kept: `pointing_cases(keep_maps=...)`)
    image_top: list[tuple[int, int]]
    bank_top: list[tuple[int, int]]


def pointing_truth(record: dict) -> dict:
    """What `pointing_cases` reads of a ground-truth record: the stored image's size and the findings it can score
    (a kind it knows, with a region). A few hundred bytes instead of the whole record's ~23 kB."""
    return {"rows": record["rows"], "columns": record["columns"],
            "findings": [{"kind": f["kind"], "region": f["region"]} for f in record.get("findings", [])
                         if f.get("kind") in KIND_FINDING and f.get("region")]}


def pointing_cases(model: AlignModel, pairs: Pairs, truths: Sequence[dict | None], *, k: int, image_size: int,
                   resize: str, keep_maps: int | None = None) -> list[PointingCase]:
    """For every image with a ground-truth record and every finding group drawn in it: its region cells, the
    word-to-patch map of the finding's words in the image's own report and its top-k cells (image-based), and the
    cells of the key patches the bank gives the report's term for that finding (bank-based).

    `keep_maps`: keep the word map of only the first that many cases with one per finding group (the heat-map
    figure's examples) and None for the rest (their top cells are kept): the scores need no maps, and every map
    kept is H x W floats per case. None keeps all."""
    grid = model.config.grid
    cases = []
    kept: dict[str, int] = {}
    # one batch of word-to-patch maps at a time (a split's maps at once would be ~T x H x W x 4 bytes per image:
    # 128 kB at 128 tokens over 16 x 16)
    for i, (truth, (tb, row, sims)) in enumerate(zip(truths, model.iter_token_maps(pairs.texts, pairs.grids),
                                                     strict=True)):
        if not truth:
            continue
        groups: dict[str, np.ndarray] = {}
        names: dict[str, tuple[str, ...]] = {}
        for f in truth.get("findings", []):
            if f.get("kind") not in KIND_FINDING or not f.get("region"):
                continue
            name, words = KIND_FINDING[f["kind"]]
            cells = region_cells(f["region"], int(truth["rows"]), int(truth["columns"]), image_size, resize, grid)
            groups[name] = groups[name] | cells if name in groups else cells
            names[name] = tuple(dict.fromkeys(names.get(name, ()) + words))
        if not groups:
            continue
        text = pairs.texts[i]
        spans = finding_spans(text)
        terms = [t for t in terms_of_text(text) if t.certainty != "absent"]
        for name, cells in sorted(groups.items()):
            sp = [s for n in names[name] for s in spans.get(n, [])]
            m = span_map(tb, row, sims, sp) if sp else None
            image_top = top_positions(m, k) if m is not None else []
            if m is not None and keep_maps is not None:
                if kept.get(name, 0) >= keep_maps:
                    m = None
                else:
                    kept[name] = kept.get(name, 0) + 1
            term = next((t for t in terms if t.pathology in names[name]), None)
            bank_top = [(kp.row, kp.col) for kp in model.bank.select([term], k)] \
                if (term is not None and model.bank is not None) else []
            cases.append(PointingCase(name, i, cells, m, image_top, bank_top))
    return cases


def pointing_metrics(cases: Sequence[PointingCase], k: int, seed: int = 0,
                     boot: int = 1000) -> dict[str, float | int | None]:
    """Per finding group: hit share of the image-based and bank-based top-k cells inside the region, a seeded
    random draw of k cells, the region's area share (the random expectation), the ratios to it, and a 95% bootstrap
    interval (over cases) of the bank ratio."""
    rng = np.random.default_rng(seed)
    out: dict[str, float | int | None] = {}
    for name in sorted({c.finding for c in cases}):
        cs = [c for c in cases if c.finding == name]
        area = float(np.mean([c.cells.mean() for c in cs]))
        img = [float(np.mean([c.cells[r, q] for r, q in c.image_top])) for c in cs if c.image_top]
        bank = [float(np.mean([c.cells[r, q] for r, q in c.bank_top])) for c in cs if c.bank_top]
        rand = []
        for c in cs:
            pick = rng.choice(c.cells.size, size=min(k, c.cells.size), replace=False)
            rand.append(float(c.cells.flat[pick].mean()))

        def r4(v: float | None) -> float | None:
            return None if v is None else round(v, 4)

        img_m = float(np.mean(img)) if img else None
        bank_m = float(np.mean(bank)) if bank else None
        out[f"pointing/n/{name}"] = len(cs)
        out[f"pointing/n_with_words/{name}"] = len(img)
        out[f"pointing/n_with_bank/{name}"] = len(bank)
        out[f"pointing/image/{name}"] = r4(img_m)
        out[f"pointing/bank/{name}"] = r4(bank_m)
        out[f"pointing/random/{name}"] = r4(float(np.mean(rand)))
        out[f"pointing/area_share/{name}"] = r4(area)
        out[f"pointing/ratio/{name}"] = r4(img_m / area) if img_m is not None and area > 0 else None
        out[f"pointing/ratio_bank/{name}"] = r4(bank_m / area) if bank_m is not None and area > 0 else None
        if bank and area > 0:  # few cases per finding: a 95% bootstrap interval over the cases says how few
            draws = rng.choice(len(bank), size=(boot, len(bank)), replace=True)
            lo, hi = np.percentile(np.asarray(bank)[draws].mean(1) / area, [2.5, 97.5])
            out[f"pointing/ratio_bank_lo/{name}"], out[f"pointing/ratio_bank_hi/{name}"] = r4(lo), r4(hi)
    return out


def heatmap_tiles(image: np.ndarray, case: PointingCase, tile: int = 128) -> list[np.ndarray]:
    """Three grey tiles for a case: the image with the region's cells outlined, the word-to-patch map (bright = more
    similar, nearest-upsampled), the image dimmed outside the region with the top-k cells boxed (image-based: solid
    white; bank-based: grey)."""
    from PIL import Image, ImageDraw

    h, w = case.cells.shape
    img = Image.fromarray(np.asarray(image, np.uint8), mode="L").resize((tile, tile), Image.Resampling.BILINEAR)
    cw, ch = tile / w, tile / h

    def boxes(im: Image.Image, cells: Sequence[tuple[int, int]], fill: int, width: int) -> None:
        d = ImageDraw.Draw(im)
        for r, c in cells:
            d.rectangle([c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1], outline=fill, width=width)

    a = img.copy()
    boxes(a, [tuple(x) for x in np.argwhere(case.cells)], 255, 1)
    if case.word_map is not None:
        m = case.word_map
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-6)
        b = Image.fromarray((m * 255).astype(np.uint8), mode="L").resize((tile, tile), Image.Resampling.NEAREST)
    else:
        b = Image.new("L", (tile, tile), 0)
    dim = np.asarray(img, np.float32) * (0.4 + 0.6 * np.kron(case.cells, np.ones((int(ch), int(cw))))[:tile, :tile]) \
        if tile % h == 0 and tile % w == 0 else np.asarray(img, np.float32)
    c = Image.fromarray(dim.astype(np.uint8), mode="L")
    boxes(c, case.bank_top, 150, 2)
    boxes(c, case.image_top, 255, 2)
    return [np.asarray(a), np.asarray(b), np.asarray(c)]
