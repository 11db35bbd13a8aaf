"""Contact sheet of the phantom: frontal and lateral images with each study's impression, read back from disk."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from cxrsynth.data import dicom
from cxrsynth.data.layout import image_path
from cxrsynth.viz import image_grid


def contact_sheet(root: Path, patients: list, impressions: dict[int, str], n: int) -> Image.Image:
    """Pick up to n readable images, spreading over archetypes and views, and caption them."""
    chosen, seen_kinds = [], set()
    candidates = [(p, s, im) for p in patients for s in p.studies for im in s.images if im.defect is None]
    # First pass: one image per new (view family, finding set) so the sheet shows variety; then fill in order.
    for p, s, im in candidates:
        key = (im.view in ("PA", "AP"), tuple(sorted(f.kind for f in s.findings)))
        if key not in seen_kinds and len(chosen) < n:
            seen_kinds.add(key)
            chosen.append((p, s, im))
    for c in candidates:
        if len(chosen) >= n:
            break
        if c not in chosen:
            chosen.append(c)
    images, captions = [], []
    for p, s, im in chosen:
        images.append(dicom.read_dicom(root / image_path(p.subject_id, s.study_id, im.dicom_id)))
        captions.append(f"{im.view} MONO{im.photometric[-1]} {im.bits_stored}b | "
                        + (impressions.get(s.study_id) or "(no conclusion)"))
    return image_grid(images, captions, cols=6, tile=224,
                      title="cxrsynth phantom (SYNTHETIC, not patient data): view, photometric, bits | conclusion")
