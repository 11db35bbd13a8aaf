"""Typed, frozen params: one dataclass per params.yaml section, validated before any work.

`load_params(path)` reads params.yaml with `yaml.safe_load` and returns a frozen `Params`. Every rule is checked
up front: an unknown section or key, a wrong type or an out-of-range value raises `ConfigError` with one line that
names the key (`fixture.patients: expected int >= 2, got 'many'`). Stages call `stage_params()` which turns that
error into a one-line message and exit status 2.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A params.yaml problem; the message is one line naming the key."""


def _opt(default: Any, *, lo: float | None = None, hi: float | None = None, choices: tuple | None = None,
         doc: str = "") -> Any:
    """A field with validation metadata: inclusive bounds or a set of allowed values."""
    kw: dict[str, Any] = {"metadata": {"lo": lo, "hi": hi, "choices": choices, "doc": doc}}
    if isinstance(default, (dict, list)):
        kw["default_factory"] = (lambda d=default: type(d)(d))
    else:
        kw["default"] = default
    return field(**kw)


@dataclass(frozen=True)
class BaseParams:
    """Shared by every stage."""

    seed: int = _opt(0, lo=0, hi=2**31 - 1, doc="master seed; every stage derives its own streams from it")
    device: str = _opt("auto", choices=("auto", "cpu", "cuda"), doc="auto = cuda when available")
    num_workers: int = _opt(2, lo=0, hi=256, doc="worker processes for parallel CPU work (0 = in-process)")


@dataclass(frozen=True)
class PathsParams:
    """Where stages read and write (dvc.yaml templates its deps/outs from these)."""

    raw: str = _opt("data/raw/mimic-cxr", doc="MIMIC-CXR root that ingest reads: DICOM tree, reports, CSVs")
    raw_jpg: str = _opt("data/raw/mimic-cxr-jpg", doc="MIMIC-CXR-JPG root that ingest reads (source: jpg)")
    phantom_raw: str = _opt("data/raw/mimic-cxr", doc="where the fixture stage writes the phantom MIMIC-CXR")
    phantom_raw_jpg: str = _opt("data/raw/mimic-cxr-jpg", doc="where the fixture stage writes the phantom JPG tree")
    phantom: str = _opt("data/raw/phantom", doc="phantom-only extras: ground truth sidecar, contact sheet")
    interim: str = _opt("data/interim", doc="ingested images, manifest, rejected records")
    prompts: str = _opt("data/prompts", doc="vocabulary, per-study findings, written prompts")
    metrics: str = _opt("metrics", doc="metrics JSON folder")


@dataclass(frozen=True)
class FixtureParams:
    """The embedded MIMIC-CXR-shaped phantom dataset (stages/fixture.py)."""

    size: str = _opt("default", doc="a key of `sizes`")
    sizes: dict = _opt({"tiny": 12, "default": 300, "bench": 1500}, doc="patients per named size")
    max_studies_per_patient: int = _opt(4, lo=1, hi=20)
    image_scale: float = _opt(0.125, lo=0.05, hi=1.0, doc="image size relative to MIMIC's (~3000 x 2500 px)")
    lateral_fraction: float = _opt(0.8, lo=0.0, hi=1.0, doc="share of PA studies that also have a lateral")
    validate_fraction: float = _opt(0.1, lo=0.0, hi=0.5, doc="share of patients in the validate split")
    test_fraction: float = _opt(0.15, lo=0.0, hi=0.5, doc="share of patients in the test split")
    monochrome1_fraction: float = _opt(0.5, lo=0.0, hi=1.0)
    cr_fraction: float = _opt(0.3, lo=0.0, hi=1.0, doc="share of CR (vs DX) images")
    jpeg2000_fraction: float = _opt(0.12, lo=0.0, hi=1.0, doc="share stored JPEG 2000 (lossless and lossy)")
    rle_fraction: float = _opt(0.05, lo=0.0, hi=1.0, doc="share stored RLE lossless")
    image_defect_fraction: float = _opt(0.02, lo=0.0, hi=0.5, doc="corrupt, truncated or missing images")
    report_defect_fraction: float = _opt(0.02, lo=0.0, hi=0.5, doc="missing, empty or non-UTF-8 reports")
    write_jpg: bool = _opt(True, doc="also write the MIMIC-CXR-JPG tree (official recipe)")
    write_reports_zip: bool = _opt(True, doc="also write mimic-cxr-reports.zip")
    contact_sheet_images: int = _opt(24, lo=1, hi=200)

    def __post_init__(self) -> None:
        for name, n in self.sizes.items():
            if not isinstance(name, str) or isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise ConfigError(f"fixture.sizes.{name}: expected a patient count int >= 2, got {n!r}")
        if self.size not in self.sizes:
            raise ConfigError(f"fixture.size: expected one of {sorted(self.sizes)}, got {self.size!r}")
        if self.validate_fraction + self.test_fraction >= 0.9:
            raise ConfigError("fixture.test_fraction: validate_fraction + test_fraction must stay below 0.9")
        if self.jpeg2000_fraction + self.rle_fraction > 1.0:
            raise ConfigError("fixture.rle_fraction: jpeg2000_fraction + rle_fraction must not exceed 1")

    @property
    def patients(self) -> int:
        return int(self.sizes[self.size])


@dataclass(frozen=True)
class IngestParams:
    """MIMIC-CXR or MIMIC-CXR-JPG -> image arrays, manifest, rejected records (stages/ingest.py)."""

    source: str = _opt("dicom", choices=("dicom", "jpg"), doc="read the DICOM tree (paths.raw) or JPGs (paths.raw_jpg)")
    views: tuple[str, ...] = _opt(("PA", "AP"), choices=("PA", "AP", "LATERAL", "LL", "AP AXIAL", "PA LLD", "AP LLD",
                                                        "LAO", "RAO", "LPO", "XTABLE LATERAL", "SWIMMERS", ""),
                                  doc="ViewPosition values to keep, in order of preference")
    per_study: str = _opt("all", choices=("all", "one"), doc="all matching images, or one per study")
    labels: str = _opt("chexpert", choices=("chexpert", "negbio"), doc="which label table to carry")
    image_size: int = _opt(128, lo=16, hi=2048, doc="side of the square stored images")
    resize: str = _opt("pad", choices=("pad", "crop"), doc="keep the whole image (pad) or centre-crop")
    voi: str = _opt("voi", choices=("voi", "minmax", "jpg_recipe"),
                    doc="DICOM display: VOI LUT/window, min-max, or the official MIMIC-CXR-JPG recipe")
    grid_images: int = _opt(24, lo=1, hi=200)

    def __post_init__(self) -> None:
        if not self.views:
            raise ConfigError("ingest.views: expected at least one view")
        if len(set(self.views)) != len(self.views):
            raise ConfigError("ingest.views: a view is listed twice")


@dataclass(frozen=True)
class PromptsParams:
    """Anatomy-pathology prompting: vocabularies, findings, written prompts (stages/prompts.py)."""

    min_count: int = _opt(3, lo=1, hi=100000, doc="terms seen in fewer training studies are cut from the vocabulary")
    n_sampled: int = _opt(200, lo=0, hi=10_000_000, doc="prompts sampled from the mined distribution")
    label_mix: str = _opt("prevalence", choices=("prevalence", "test", "balanced"),
                          doc="primary pathology by training frequency, by test-split frequency, or uniformly")
    max_findings: int = _opt(4, lo=1, hi=20, doc="positive findings per sampled prompt, at most")
    max_negatives: int = _opt(2, lo=0, hi=20, doc="pertinent negatives per sampled prompt, at most")
    paired: bool = _opt(True, doc="also one prompt per test study, from its own report's findings")
    writer: str = _opt("template", choices=("template", "hf", "http"))
    hf_model_path: str = _opt("", doc="local folder of a causal LM (writer: hf)")
    http_url: str = _opt("", doc="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (writer: http)")
    http_model: str = _opt("", doc="model name sent to the endpoint (writer: http)")
    http_api_key_env: str = _opt("OPENAI_API_KEY", doc="environment variable holding the API key (writer: http)")
    max_new_tokens: int = _opt(200, lo=1, hi=4096)
    temperature: float = _opt(0.7, lo=0.0, hi=5.0)
    long_report_chars: int = _opt(5000, lo=100, hi=10_000_000, doc="reports longer than this are counted as long")

    def __post_init__(self) -> None:
        if self.writer == "hf" and not self.hf_model_path:
            raise ConfigError("prompts.hf_model_path: required when prompts.writer is hf")
        if self.writer == "http" and not self.http_url:
            raise ConfigError("prompts.http_url: required when prompts.writer is http")


@dataclass(frozen=True)
class Params:
    base: BaseParams = field(default_factory=BaseParams)
    paths: PathsParams = field(default_factory=PathsParams)
    fixture: FixtureParams = field(default_factory=FixtureParams)
    ingest: IngestParams = field(default_factory=IngestParams)
    prompts: PromptsParams = field(default_factory=PromptsParams)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(key: str, value: Any, tp: Any, meta: dict) -> Any:
    """Validate one value against its annotation and metadata; return it (tuples for lists)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp = args[0]
        origin = get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
    elif tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    elif origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = get_args(tp)[0]
        value = tuple(_check_value(f"{key}[{i}]", v, inner, {}) for i, v in enumerate(value))
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices is not None:
        items = value if isinstance(value, tuple) else (value,)
        for v in items:
            if v not in choices:
                raise ConfigError(f"{key}: expected one of {list(choices)}, got {v!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ConfigError(f"{key}: expected {_type_name(tp)} in {bounds}, got {value!r}")
    return value


def build_section(cls: type, name: str, raw: Any) -> Any:
    """Turn one params.yaml section (a mapping) into its frozen dataclass, rejecting unknown keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(sorted(fields))})")
    values = {k: _check_value(f"{name}.{k}", v, hints[k], dict(fields[k].metadata)) for k, v in raw.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a __post_init__ rule
        raise ConfigError(f"{name}: {e}") from e


def params_from_dict(raw: Any, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections")
    sections = {f.name: f for f in dataclasses.fields(Params)}
    hints = get_type_hints(Params)
    for name in raw:
        if name not in sections:
            raise ConfigError(f"{name}: unknown params section (known: {', '.join(sections)})")
    return Params(**{name: build_section(hints[name], name, raw.get(name)) for name in sections})


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; every problem is a ConfigError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    return params_from_dict(raw or {}, str(path))


def stage_params(path: str | Path = "params.yaml") -> Params:
    """load_params for stage entry points: a bad param prints one line and exits with status 2."""
    try:
        return load_params(path)
    except ConfigError as e:
        print(f"params error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) rows of a section, for the README and --help output."""
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("doc", "")))
    return rows
