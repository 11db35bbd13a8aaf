"""The evaluation's per-item table: one row per synthetic image, real test image and reference-floor image, with
everything the headline numbers are computed from (`cxrsynth.eval.headlines` recomputes each of them from it).

Columns (absent values are null / NaN):
- `role`: `synthetic` | `real_test` | `floor` (real training images of the fidelity floor) | `ceiling` (their
  VQ-GAN reconstructions: what a perfect token generator would draw);
- `unit`: the resampling unit of the bootstrap: the prompt id for a synthetic image (samples of one prompt move
  together), the image id otherwise; `item_id`: synthetic_id or dicom_id;
- `prompt_id`, `kind`, `view`, `source_dicom_id` (synthetic images made from a real test report);
- `label/<obs>`: the 14 CheXpert values (1 / 0 / -1 / NaN blank) of the prompt (synthetic) or of the report (real);
  `source_label/<obs>`: the counterpart real test image's labels (paired rows);
- `prob/<obs>`: the evaluation classifier's probability; `utility/<arm>/prob/<obs>` (real test rows): the
  probabilities of the three utility classifiers;
- `ctr`, `effusion_side` (the side a prompt asks a one-sided effusion on, or the phantom truth's side for a real
  image), `effusion_asymmetry`, `cardiomegaly` (asked / true);
- `nn_feature_distance`, `nn_feature_index`, `nn_pixel_distance`, `near_copy_feature`, `near_copy_pixel`,
  `near_copy` (synthetic rows; the thresholds are in the metadata);
- `feature`: the fidelity features (classifier space), float32.

The file's Arrow schema metadata `cxrsynth` holds what the statistics need besides the rows (blank policy,
min_count, prdc_k, near-copy thresholds, the extractor's name, seed). Written as one parquet file.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxrsynth.errors import UserError
from cxrsynth.text.chexpert import OBSERVATIONS

ITEMS_FILE = "items.parquet"
ROLES = ("synthetic", "real_test", "floor", "ceiling")
META_KEY = b"cxrsynth"
FORMAT_VERSION = 1


class ItemsError(UserError):
    """A per-item table that cannot be used; the message names it."""


def label_cols(prefix: str = "label") -> list[str]:
    return [f"{prefix}/{o}" for o in OBSERVATIONS]


def frame(role: str, unit, item_id, features: np.ndarray | None = None, **columns) -> pd.DataFrame:
    """Rows of one role: `columns` maps a column name to a length-n sequence, or to an n x 14 array for a name
    ending in `/` (expanded to `<name><obs>`)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    unit = [str(u) for u in unit]
    n = len(unit)
    data: dict = {"role": [role] * n, "unit": unit, "item_id": [str(i) for i in item_id]}
    for name, v in columns.items():
        if name.endswith("/"):
            arr = np.asarray(v, np.float64).reshape(n, len(OBSERVATIONS))
            for j, o in enumerate(OBSERVATIONS):
                data[f"{name}{o}"] = arr[:, j]
        else:
            if len(v) != n:
                raise ValueError(f"column {name}: {len(v)} values for {n} rows")
            data[name] = list(v) if not isinstance(v, np.ndarray) else v
    out = pd.DataFrame(data)
    if features is not None:
        f = np.asarray(features, np.float32)
        if len(f) != n:
            raise ValueError(f"{len(f)} feature rows for {n} items")
        out["feature"] = list(f)
    return out


def write_items(path: str | Path, parts: list[pd.DataFrame], meta: dict) -> Path:
    """Concatenate the role frames and write them with `meta` (JSON) in the schema metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.concat(parts, ignore_index=True, sort=False)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if "feature" in df.columns:
        dim = max((len(v) for v in df["feature"] if v is not None and not (isinstance(v, float))), default=0)
        table = table.set_column(table.schema.get_field_index("feature"), "feature",
                                 pa.array([None if not isinstance(v, np.ndarray) else v.astype(np.float32)
                                           for v in df["feature"]], type=pa.list_(pa.float32(), dim)))
    md = dict(table.schema.metadata or {})
    md[META_KEY] = json.dumps({"format_version": FORMAT_VERSION, **meta}, sort_keys=True).encode()
    pq.write_table(table.replace_schema_metadata(md), path)
    return path


class Items:
    """A read per-item table: `df` (rows), `meta` (dict) and row selection helpers."""

    def __init__(self, df: pd.DataFrame, meta: dict, source: str = "") -> None:
        missing = [c for c in ("role", "unit", "item_id") if c not in df.columns]
        if missing:
            raise ItemsError(f"{source or 'items'}: missing columns {missing}")
        self.df, self.meta, self.source = df.reset_index(drop=True), meta, source
        self.memo: dict = {}  # what several headlines' statistics share (e.g. one PRDC per resample)

    def role(self, role: str) -> pd.DataFrame:
        return self.df[self.df.role == role].reset_index(drop=True)

    def features(self, role: str) -> np.ndarray:
        rows = self.role(role)
        if "feature" not in rows.columns or not len(rows):
            return np.zeros((0, 0), np.float32)
        return np.stack([np.asarray(v, np.float32) for v in rows["feature"]])


def read_items(source, name: str = "") -> Items:
    """A per-item table from a path or bytes (what `dvc.api.read(..., mode='rb')` returns)."""
    try:
        if isinstance(source, (bytes, bytearray)):
            table = pq.read_table(io.BytesIO(source))
        else:
            table = pq.read_table(source)
    except (OSError, pa.ArrowInvalid) as e:
        raise ItemsError(f"{name or source}: not a readable per-item table ({e})") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ItemsError(f"{name or source}: no cxrsynth metadata (not written by the evaluate stage)")
    meta = json.loads(raw)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ItemsError(f"{name or source}: per-item format {meta.get('format_version')}, this code reads "
                         f"{FORMAT_VERSION}")
    return Items(table.to_pandas(), meta, str(name or source))
