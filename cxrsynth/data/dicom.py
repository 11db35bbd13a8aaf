"""DICOM I/O for chest radiographs.

Writer: phantom CR / DX "For Presentation" files shaped like a hospital's (MIMIC-CXR layout), byte-deterministic.
Reader: real chest DICOMs of any BitsStored, MONOCHROME1/2, modality + VOI LUTs, native or compressed pixel data;
every failure on a bad file is a :class:`DicomReadError` with a machine-readable ``reason``.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import struct
import uuid
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder, get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    RLELossless,
)

log = logging.getLogger(__name__)

__all__ = [
    "DicomSpec",
    "DicomReadError",
    "TRANSFER_SYNTAXES",
    "make_uid",
    "display_to_stored",
    "write_dicom",
    "read_dicom",
    "read_dicom_header",
    "official_jpg_recipe",
    "equalize_hist",
]

# --------------------------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------------------------

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit_le": ExplicitVRLittleEndian,
    "implicit_le": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000_lossless": JPEG2000Lossless,
    "jpeg2000": JPEG2000,
}

SOP_CLASS_UIDS = {
    "DX": UID("1.2.840.10008.5.1.4.1.1.1.1"),  # Digital X-Ray Image Storage - For Presentation
    "CR": UID("1.2.840.10008.5.1.4.1.1.1"),  # Computed Radiography Image Storage
}

# Fixed so that identical inputs give byte-identical files (pydicom would otherwise stamp its own version).
IMPLEMENTATION_CLASS_UID = "2.25.104279446179513363304894569717713458673"
IMPLEMENTATION_VERSION_NAME = "CXRSYNTH_1"

# SNOMED-RT ("SRT") codes, the scheme hospitals used in 2011-2016 (CID 4010 DX View, CID 19 Patient Orientation,
# CID 4031 Common Anatomic Regions).
_VIEW_CODES = {
    "postero-anterior": "R-10214",
    "antero-posterior": "R-10206",
    "lateral": "R-102CD",
    "left lateral": "R-10236",
    "right lateral": "R-10232",
    "left posterior oblique": "R-10212",
    "right posterior oblique": "R-10210",
    "left anterior oblique": "R-10220",
    "right anterior oblique": "R-40985",
}
_DEFAULT_VIEW_MEANING = {
    "PA": "postero-anterior",
    "AP": "antero-posterior",
    "LATERAL": "lateral",
    "LL": "left lateral",
    "RL": "right lateral",
    "LPO": "left posterior oblique",
    "RPO": "right posterior oblique",
    "LAO": "left anterior oblique",
    "RAO": "right anterior oblique",
}
_ORIENTATION_CODES = {"erect": "F-10440", "recumbent": "F-10450"}
_CHEST = ("T-D3000", "SRT", "Chest")
_DEID_METHODS = (
    ("113100", "DCM", "Basic Application Confidentiality Profile"),
    ("113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option"),
)
_LOCAL_SCHEME = "99CXRSYNTH"  # hospital-local procedure codes use a private '99' scheme

_MONO = ("MONOCHROME1", "MONOCHROME2")
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_DATE_RE = re.compile(r"^[0-9]{8}$")
_TIME_RE = re.compile(r"^[0-9]{6}(\.[0-9]{1,6})?$")
_CS_RE = re.compile(r"^[A-Z0-9 _]{0,16}$")

READ_REASONS = frozenset(
    {
        "corrupt",
        "truncated",
        "unsupported_transfer_syntax",
        "no_pixel_data",
        "not_monochrome",
        "empty_file",
        "missing_file",
    }
)


# --------------------------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomSpec:
    """Everything written into one phantom file except the pixels. All identifiers are synthetic.

    UIDs are '2.25.<decimal>' strings made by the caller (see :func:`make_uid`). ``view_code_meaning`` empty means
    "derive from view_position" (PA -> postero-anterior, ...); a view without a known meaning gets an empty
    ViewCodeSequence. ``lossy_ratio`` is the target JPEG 2000 compression ratio for ``transfer_syntax='jpeg2000'``.
    """

    patient_name: str
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS.ffffff
    accession_number: str = ""
    patient_sex: str = ""  # M | F | O | ''
    patient_birth_date: str = ""  # YYYYMMDD | ''
    view_position: str = "PA"
    modality: str = "DX"  # DX | CR
    photometric: str = "MONOCHROME2"
    bits_stored: int = 12  # 10..16
    transfer_syntax: str = "explicit_le"
    performed_procedure_description: str = "CHEST (PA AND LAT)"
    patient_orientation_meaning: str = ""  # 'Erect' | 'Recumbent' | ''
    view_code_meaning: str = ""
    pixel_spacing_mm: float = 0.139
    manufacturer: str = "PHANTOM IMAGING"
    manufacturer_model_name: str = "SYNTHDR 1"
    station_name: str = "PHANTOMDR01"
    series_number: int = 1
    instance_number: int = 1
    image_laterality: str = "U"  # chest is unpaired
    series_description: str = ""
    acquisition_device_processing_description: str = ""
    lossy_ratio: float = 10.0
    deidentified: bool = True  # flags as MIMIC does; names/IDs above are still written (leak checks must catch them)

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"DicomSpec.{field}={getattr(self, field)!r}: {why}")

        if self.modality not in SOP_CLASS_UIDS:
            raise bad("modality", f"must be one of {sorted(SOP_CLASS_UIDS)}")
        _check_pixel_format(self.bits_stored, self.photometric)
        if self.transfer_syntax not in TRANSFER_SYNTAXES:
            raise bad("transfer_syntax", f"must be one of {sorted(TRANSFER_SYNTAXES)}")
        for field in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
            value = getattr(self, field)
            if not isinstance(value, str) or len(value) > 64 or not _UID_RE.match(value):
                raise bad(field, "not a valid DICOM UID (digits and dots, at most 64 characters)")
        if not _DATE_RE.match(self.study_date):
            raise bad("study_date", "expected YYYYMMDD")
        if not _TIME_RE.match(self.study_time):
            raise bad("study_time", "expected HHMMSS or HHMMSS.ffffff")
        if self.patient_birth_date and not _DATE_RE.match(self.patient_birth_date):
            raise bad("patient_birth_date", "expected YYYYMMDD or ''")
        for field, limit in (("patient_name", 64), ("patient_id", 64), ("accession_number", 16)):
            if len(getattr(self, field)) > limit or "\\" in getattr(self, field):
                raise bad(field, f"at most {limit} characters, no backslash")
        if not _CS_RE.match(self.view_position):
            raise bad("view_position", "expected a DICOM code string (A-Z, 0-9, space, underscore; at most 16)")
        if self.patient_sex not in ("M", "F", "O", ""):
            raise bad("patient_sex", "expected 'M', 'F', 'O' or ''")
        if self.image_laterality not in ("R", "L", "U", "B"):
            raise bad("image_laterality", "expected R, L, U or B")
        if not self.pixel_spacing_mm > 0:
            raise bad("pixel_spacing_mm", "must be > 0")
        if not self.lossy_ratio >= 1:
            raise bad("lossy_ratio", "must be >= 1")
        meaning = self.resolved_view_code_meaning()
        if meaning and meaning.lower() not in _VIEW_CODES:
            raise bad("view_code_meaning", f"no SNOMED view code known; known: {sorted(_VIEW_CODES)}")
        orient = self.patient_orientation_meaning
        if orient and orient.lower() not in _ORIENTATION_CODES:
            raise bad("patient_orientation_meaning", "expected 'Erect', 'Recumbent' or ''")

    def resolved_view_code_meaning(self) -> str:
        """The ViewCodeSequence meaning: the explicit one, else the default for view_position, else ''."""
        return self.view_code_meaning or _DEFAULT_VIEW_MEANING.get(self.view_position.upper(), "")


def _check_pixel_format(bits_stored: int, photometric: str) -> None:
    if not isinstance(bits_stored, (int, np.integer)) or not 10 <= int(bits_stored) <= 16:
        raise ValueError(f"bits_stored={bits_stored!r}: must be an integer in 10..16")
    if photometric not in _MONO:
        raise ValueError(f"photometric={photometric!r}: must be MONOCHROME1 or MONOCHROME2")


def make_uid(rng: np.random.Generator) -> str:
    """A '2.25.' UID from 128 bits drawn from ``rng`` (deterministic for a seeded rng).

    The bits are stamped as a version-4 UUID, as PS3.5 B.2 asks of '2.25.' UIDs.
    """
    return f"2.25.{uuid.UUID(bytes=rng.bytes(16), version=4).int}"


def display_to_stored(display: np.ndarray, bits_stored: int, photometric: str) -> np.ndarray:
    """Map a display image (float in [0, 1], bright = dense) to uint16 stored values in 0..2**bits_stored-1.

    MONOCHROME1 stores the inverse (dense = low values), so a viewer applying the photometric inversion shows the
    same picture. Values within 1e-6 outside [0, 1] are clipped (float round-off); anything else is an error.
    """
    _check_pixel_format(bits_stored, photometric)
    arr = np.asarray(display)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"display image must be a non-empty 2-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"display image must be floating point in [0, 1], got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError("display image contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"display image must lie in [0, 1], got range [{lo:.6g}, {hi:.6g}]")
    top = (1 << int(bits_stored)) - 1
    stored = np.rint(np.clip(arr.astype(np.float64), 0.0, 1.0) * top).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = np.uint16(top) - stored
    return stored


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _procedure_code_value(description: str) -> str:
    # Stable per description, like a hospital's local order code.
    return f"CXR{zlib.crc32(description.encode('utf-8')) % 1_000_000:06d}"


def _patient_orientation(view_position: str) -> list[str]:
    # Conventional display: frontal films with the patient's right on the viewer's left, laterals facing left.
    view = view_position.upper()
    if view in ("LL", "LATERAL", "XTABLE LATERAL"):
        return ["P", "F"]
    if view == "RL":
        return ["A", "F"]
    if view in ("PA", "AP", "AP AXIAL", "PA LLD", "AP LLD", "PA RLD", "AP RLD", "LPO", "RPO", "LAO", "RAO"):
        return ["L", "F"]
    return []


def _build_dataset(stored: np.ndarray, spec: DicomSpec) -> Dataset:
    """Header + native pixel data for ``stored`` (uint16, rows x cols)."""
    rows, cols = stored.shape
    if rows > 0xFFFF or cols > 0xFFFF:
        raise ValueError(f"image {rows}x{cols} too large for DICOM Rows/Columns (max 65535)")
    is_dx = spec.modality == "DX"
    sop_class = SOP_CLASS_UIDS[spec.modality]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = spec.sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # switched below for other syntaxes
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME

    ds = Dataset()
    ds.file_meta = meta
    # SOP common, no wall-clock time anywhere: instance creation is stamped with the study date/time.
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.InstanceCreationDate = spec.study_date
    ds.InstanceCreationTime = spec.study_time
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = spec.sop_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = spec.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = spec.study_time
    ds.AccessionNumber = spec.accession_number
    ds.Modality = spec.modality
    ds.Manufacturer = spec.manufacturer
    ds.ReferringPhysicianName = ""
    ds.StationName = spec.station_name
    ds.StudyDescription = spec.performed_procedure_description
    ds.ProcedureCodeSequence = Sequence(
        [
            _code(
                _procedure_code_value(spec.performed_procedure_description),
                _LOCAL_SCHEME,
                spec.performed_procedure_description,
            )
        ]
        if spec.performed_procedure_description
        else []
    )
    if spec.series_description:
        ds.SeriesDescription = spec.series_description
    ds.ManufacturerModelName = spec.manufacturer_model_name
    ds.AnatomicRegionSequence = Sequence([_code(*_CHEST)])

    # Patient
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.patient_birth_date
    ds.PatientSex = spec.patient_sex
    if spec.deidentified:
        # MIMIC files carry these flags; the synthetic name/ID above are deliberately kept.
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "BASIC PROFILE; MODIFIED DATES"
        ds.DeidentificationMethodCodeSequence = Sequence([_code(*c) for c in _DEID_METHODS])
        ds.LongitudinalTemporalInformationModified = "MODIFIED"

    # Acquisition / positioning
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = spec.view_position
    if spec.acquisition_device_processing_description:
        ds.AcquisitionDeviceProcessingDescription = spec.acquisition_device_processing_description
    meaning = spec.resolved_view_code_meaning()
    ds.ViewCodeSequence = Sequence([_code(_VIEW_CODES[meaning.lower()], "SRT", meaning)] if meaning else [])
    if spec.patient_orientation_meaning:
        ds.PatientOrientationCodeSequence = Sequence(
            [
                _code(
                    _ORIENTATION_CODES[spec.patient_orientation_meaning.lower()],
                    "SRT",
                    spec.patient_orientation_meaning,
                )
            ]
        )
    ds.PerformedProcedureStepDescription = spec.performed_procedure_description
    spacing = f"{spec.pixel_spacing_mm:.6g}"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]

    # Study / series / instance
    ds.StudyInstanceUID = spec.study_instance_uid
    ds.SeriesInstanceUID = spec.series_instance_uid
    ds.StudyID = ""
    ds.SeriesNumber = int(spec.series_number)
    ds.InstanceNumber = int(spec.instance_number)
    ds.PatientOrientation = _patient_orientation(spec.view_position)

    if is_dx:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = spec.image_laterality
        ds.PositionerType = "NONE" if spec.view_position.upper() == "AP" else "COLUMN"  # portable AP: no stand
        ds.DetectorType = "SCINTILLATOR"
        # LOG data; sign -1 when high values mean less beam intensity (= dense, MONOCHROME2).
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1 if spec.photometric == "MONOCHROME2" else 1
        ds.PresentationLUTShape = "IDENTITY" if spec.photometric == "MONOCHROME2" else "INVERSE"
        ds.AcquisitionContextSequence = Sequence([])
        ds.BurnedInAnnotation = "NO"

    # Image pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = int(spec.bits_stored)
    ds.HighBit = int(spec.bits_stored) - 1
    ds.PixelRepresentation = 0
    # Window exactly spanning the stored min..max under the LINEAR function (PS3.3 C.11.2.1.2.1): lo -> black end,
    # hi -> white end of the output range. Applies to stored values; MONOCHROME1 inversion is the viewer's job.
    lo, hi = int(stored.min()), int(stored.max())
    ds.WindowCenter = f"{(lo + hi) / 2 + 0.5:.1f}"
    ds.WindowWidth = str(hi - lo + 1)
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    ds.PixelData = stored.astype("<u2", copy=False).tobytes()
    return ds


def _encode(ds: Dataset, stored: np.ndarray, spec: DicomSpec) -> None:
    tsyntax = TRANSFER_SYNTAXES[spec.transfer_syntax]
    if not tsyntax.is_compressed:
        ds.file_meta.TransferSyntaxUID = tsyntax
        return
    kwargs: dict = {"generate_instance_uid": False}  # the caller owns every UID
    if tsyntax == RLELossless:
        # pylibjpeg-rle is ~20x faster than pydicom's pure-Python encoder, which stays as the fallback.
        rle_plugins = get_encoder(RLELossless).available_plugins
        kwargs["encoding_plugin"] = "pylibjpeg" if "pylibjpeg" in rle_plugins else "pydicom"
    else:
        kwargs["encoding_plugin"] = "pylibjpeg"  # openjpeg; precision = BitsStored from the dataset
        if tsyntax == JPEG2000:
            kwargs["j2k_cr"] = [float(spec.lossy_ratio)]
    try:
        ds.compress(tsyntax, stored, **kwargs)
    except Exception as exc:  # a missing plugin or encoder error
        raise RuntimeError(f"cannot encode pixel data as {tsyntax.name} ({spec.transfer_syntax}): {exc}") from exc
    if tsyntax == JPEG2000:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = f"{stored.nbytes / len(frame):.2f}"
        ds.LossyImageCompressionMethod = "ISO_15444_1"


def write_dicom(path: str | os.PathLike, display: np.ndarray, spec: DicomSpec) -> None:
    """Write ``display`` (float [0, 1], bright = dense) as a DICOM Part 10 file described by ``spec``.

    Byte-deterministic: no clock, no generated UIDs, fixed implementation UID/version. The file is written to a
    temporary sibling and renamed, so a crash never leaves a half-written image behind.
    """
    path = Path(path)
    try:
        stored = display_to_stored(display, spec.bits_stored, spec.photometric)
        ds = _build_dataset(stored, spec)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    try:
        _encode(ds, stored, spec)
    except RuntimeError as exc:
        raise RuntimeError(f"{path}: {exc}") from exc
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------------------------


class DicomReadError(Exception):
    """A DICOM file that cannot be turned into an image. ``reason`` is one of :data:`READ_REASONS`."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str):
        assert reason in READ_REASONS, reason
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason}: {detail}")

    def __reduce__(self):  # keep picklable for multiprocessing pools
        return (type(self), (self.path, self.reason, self.detail))


_EOF_WARNING = re.compile(r"end of file|eof|fewer bytes|less than expected", re.IGNORECASE)


def _looks_like_bare_dataset(path: Path) -> bool:
    """A DICOM dataset without the 128-byte preamble/'DICM' starts with a low group (file meta or identifying)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        return False
    group, _elem = struct.unpack("<HH", head[:4])
    return group in (0x0002, 0x0008)


def _has_part10_prefix(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(132)[128:132] == b"DICM"


def _truncation_signs(ds: Dataset, file_size: int, caught: list) -> str:
    """Why ``ds`` looks cut short, or '' if it does not. pydicom reads short values and cut sequences quietly."""
    for w in caught:
        if _EOF_WARNING.search(str(w.message)):
            return str(w.message)
    tags = list(ds.keys())
    meta = getattr(ds, "file_meta", None) or {}
    group_length = meta.get("FileMetaInformationGroupLength")
    if getattr(ds, "preamble", None) is not None and group_length:
        data_start = 128 + 4 + 12 + int(group_length)  # preamble, 'DICM', group length element, rest of the meta
        if file_size < data_start:
            return f"file ends inside the file meta information ({file_size} of {data_start} bytes)"
        if not tags and file_size - data_start < 8:
            return "file ends before the first data element"
    if not tags:
        return ""
    last = max(tags)  # the last element in file order for a well-formed file
    if "PixelData" in ds and last > 0x7FE00010:
        return ""  # cut (or junk) after the pixel data: the image itself is whole
    raw = ds.get_item(last)
    if isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF and raw.value is not None:
        if len(raw.value) < raw.length:
            return f"element {raw.tag} declares {raw.length} bytes but only {len(raw.value)} remain"
        end = raw.value_tell + raw.length
        if "PixelData" not in ds and 0 < file_size - end < 8:
            return f"{file_size - end} stray bytes after the last element (a cut element header)"
    return ""


def _ensure_transfer_syntax(ds: Dataset) -> UID:
    meta = ds.get("file_meta") or FileMetaDataset()
    tsyntax = meta.get("TransferSyntaxUID")
    if not tsyntax:
        # Bare dataset: pydicom guessed the encoding while reading; record it so the decoders know.
        implicit, little = ds.original_encoding
        tsyntax = (
            ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
        meta.TransferSyntaxUID = tsyntax
        ds.file_meta = meta
    return UID(str(tsyntax))


def broken_link_detail(p: Path) -> str:
    """'broken symbolic link to TARGET' when `p` is a link to nothing, else ''."""
    if not p.is_symlink():
        return ""
    try:
        return f"broken symbolic link to {os.readlink(p)}"
    except OSError:
        return "broken symbolic link"


def _open_dataset(path: str | os.PathLike, header_only: bool) -> tuple[Dataset, UID]:
    """dcmread with every failure mapped to a DicomReadError."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DicomReadError(p, "missing_file", broken_link_detail(p) or "no such file") from None
    except OSError as exc:
        raise DicomReadError(p, "missing_file", f"cannot stat: {exc}") from None
    if not p.is_file():
        raise DicomReadError(p, "missing_file", "not a regular file")
    if st.st_size == 0:
        raise DicomReadError(p, "empty_file", "0 bytes")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=header_only)
            except InvalidDicomError:
                if not _looks_like_bare_dataset(p):
                    raise DicomReadError(p, "corrupt", "not a DICOM file (no 'DICM' prefix, no dataset start)")
                ds = pydicom.dcmread(p, stop_before_pixels=header_only, force=True)
        except DicomReadError:
            raise
        except (EOFError, struct.error) as exc:
            raise DicomReadError(p, "truncated", f"file ends inside the header ({exc})") from None
        except OSError as exc:
            if exc.errno is not None:  # a real I/O failure, not pydicom's complaint about the bytes
                raise DicomReadError(p, "missing_file", f"cannot read: {exc}") from None
            reason = "truncated" if "no tag to read" in str(exc).lower() else "corrupt"  # cut inside a sequence
            raise DicomReadError(p, reason, f"unreadable header ({exc})") from None
        except Exception as exc:
            if st.st_size < 144 and _has_part10_prefix(p):  # cut inside the file meta group length
                raise DicomReadError(p, "truncated", f"file ends inside the file meta ({exc})") from None
            raise DicomReadError(p, "corrupt", f"unreadable header ({type(exc).__name__}: {exc})") from None

    try:
        meta = ds.get("file_meta") or {}
        has_prefix = getattr(ds, "preamble", None) is not None
        meta_started = "FileMetaInformationGroupLength" in meta or "TransferSyntaxUID" in meta
        recognisable = any(tag in ds for tag in ("SOPClassUID", "Rows", "PixelData", "Modality"))
        if not recognisable and not meta_started and not (has_prefix and st.st_size < 144):
            # Checked before truncation: random bytes parse as elements with absurd lengths that "run past the end".
            raise DicomReadError(p, "corrupt", "no recognisable DICOM attributes")
        why = _truncation_signs(ds, st.st_size, caught)
        if why:
            raise DicomReadError(p, "truncated", why)
        if not recognisable:
            if has_prefix and ("TransferSyntaxUID" in meta or st.st_size < 144):
                # A valid Part 10 start followed by (almost) nothing: the file was cut early.
                raise DicomReadError(p, "truncated", "file ends before any image attributes")
            raise DicomReadError(p, "corrupt", "no recognisable DICOM attributes")
        tsyntax = _ensure_transfer_syntax(ds)
    except DicomReadError:
        raise
    except Exception as exc:
        raise DicomReadError(p, "corrupt", f"unparseable header ({type(exc).__name__}: {exc})") from None
    for w in caught:
        log.debug("%s: pydicom: %s", p, w.message)
    return ds, tsyntax


def _warnings_to_log(fn):
    """Route pydicom's warnings about odd values to the debug log: over 377k files they are noise on stderr.

    (warnings.catch_warnings is process-global: call the readers from processes, not threads.)
    """

    @functools.wraps(fn)
    def wrapper(path, *args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return fn(path, *args, **kwargs)
            finally:
                for w in caught:
                    log.debug("%s: %s", path, w.message)

    return wrapper


def _str(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _seq_meaning(ds: Dataset, keyword: str) -> str:
    seq = ds.get(keyword)
    if not seq:
        return ""
    return str(seq[0].get("CodeMeaning", "")).strip()


PERSON_NAME_ATTRIBUTES = ("PatientName", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                          "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "OtherPatientNames")


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


@_warnings_to_log
def read_dicom_header(path: str | os.PathLike) -> dict:
    """The attributes the pipeline needs, without reading pixel data.

    Keys: transfer_syntax (UID string), sop_class_uid, modality, view_position, photometric, rows, columns,
    bits_allocated, bits_stored, pixel_representation, number_of_frames, study_date, study_time,
    performed_procedure_description, procedure_code_meaning, view_code_meaning, patient_orientation_meaning
    (the MIMIC metadata CSV columns), person_names (every non-empty person name in the header, for report
    redaction). Missing strings are '', missing integers None.
    """
    ds, tsyntax = _open_dataset(path, header_only=True)
    try:
        return {
            "transfer_syntax": str(tsyntax),
            "sop_class_uid": _str(ds, "SOPClassUID"),
            "modality": _str(ds, "Modality"),
            "view_position": _str(ds, "ViewPosition"),
            "photometric": _str(ds, "PhotometricInterpretation").upper(),
            "rows": _int(ds, "Rows"),
            "columns": _int(ds, "Columns"),
            "bits_allocated": _int(ds, "BitsAllocated"),
            "bits_stored": _int(ds, "BitsStored"),
            "pixel_representation": _int(ds, "PixelRepresentation"),
            "number_of_frames": _int(ds, "NumberOfFrames") or 1,
            "study_date": _str(ds, "StudyDate"),
            "study_time": _str(ds, "StudyTime"),
            "performed_procedure_description": _str(ds, "PerformedProcedureStepDescription"),
            "procedure_code_meaning": _seq_meaning(ds, "ProcedureCodeSequence"),
            "view_code_meaning": _seq_meaning(ds, "ViewCodeSequence"),
            "patient_orientation_meaning": _seq_meaning(ds, "PatientOrientationCodeSequence"),
            "person_names": [str(v) for k in PERSON_NAME_ATTRIBUTES for v in _as_list(ds.get(k, None)) if str(v)],
        }
    except Exception as exc:  # a malformed value deep in the header
        raise DicomReadError(path, "corrupt", f"unparseable header ({type(exc).__name__}: {exc})") from None


def _stored_pixels(path: str | os.PathLike) -> tuple[Dataset, np.ndarray]:
    """The dataset and its first frame's stored values (rows, cols), after all validity checks."""
    ds, tsyntax = _open_dataset(path, header_only=False)
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        detail = f"only {other[0]} (unsupported)" if other else "no Pixel Data element"
        raise DicomReadError(path, "no_pixel_data", detail)
    try:
        photometric = _str(ds, "PhotometricInterpretation").upper()
        samples = _int(ds, "SamplesPerPixel") or 1
        rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
        bits_allocated = _int(ds, "BitsAllocated")
        frames = _int(ds, "NumberOfFrames") or 1
    except Exception as exc:
        raise DicomReadError(path, "corrupt", f"unparseable image attributes ({exc})") from None
    if samples != 1 or photometric not in _MONO:
        raise DicomReadError(
            path, "not_monochrome", f"PhotometricInterpretation {photometric or '?'}, SamplesPerPixel {samples}"
        )
    if not rows or not cols or not bits_allocated:
        raise DicomReadError(path, "corrupt", "Rows, Columns or BitsAllocated missing or zero")

    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        detail = f"no decoder for {tsyntax} ({tsyntax.name})"
        raise DicomReadError(path, "unsupported_transfer_syntax", detail) from None
    if not decoder.is_available:
        raise DicomReadError(
            path,
            "unsupported_transfer_syntax",
            f"{tsyntax.name}: decoder plugins missing ({'; '.join(decoder.missing_dependencies)})",
        )

    if not tsyntax.is_encapsulated:
        expected = (rows * cols * frames * bits_allocated + 7) // 8
        got = len(ds.PixelData or b"")
        if got < expected:
            detail = f"pixel data has {got} bytes, {rows}x{cols}x{frames} needs {expected}"
            raise DicomReadError(path, "truncated", detail)

    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise DicomReadError(path, "corrupt", f"cannot decode {tsyntax.name} pixel data ({exc})") from None
    if arr.ndim == 3:
        arr = arr[0]  # multi-frame: radiographs have one frame; take the first
    if arr.shape != (rows, cols):
        raise DicomReadError(path, "corrupt", f"decoded shape {arr.shape} != Rows x Columns {(rows, cols)}")
    return ds, arr


def _minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return (values.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)


def _linear_window(ds: Dataset) -> tuple[float, float] | None:
    """(center, width) when the file has one usable LINEAR window (first of several, as pydicom uses)."""
    if str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper() != "LINEAR":
        return None
    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    try:
        c = float(c[0] if isinstance(c, (list, tuple, MultiValue)) else c)
        w = float(w[0] if isinstance(w, (list, tuple, MultiValue)) else w)
    except (TypeError, ValueError, IndexError):
        return None
    return (c, w) if w > 1 else None


def _voi_normalised(values: np.ndarray, ds: Dataset, path) -> np.ndarray | None:
    """VOI LUT (preferred, as pydicom does) or window applied and scaled to [0, 1]; None when there is none usable.

    pydicom returns VOI output in the stored-value range; we normalise by that output range: for a window the
    values at -inf/+inf, for a LUT its smallest/largest entry (some vendors declare a 16-bit LUT holding 12-bit
    entries, so the declared depth would leave the image dark).
    """
    seq = ds.get("VOILUTSequence")
    has_lut = bool(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None
    has_window = ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, "")
    try:
        if has_lut:
            nr_entries, first_map = int(seq[0].LUTDescriptor[0]) or 65536, int(seq[0].LUTDescriptor[1])
            ints = values if np.issubdtype(values.dtype, np.integer) else np.rint(values).astype(np.int64)
            entries = apply_voi(np.arange(first_map, first_map + nr_entries, dtype=np.int64), ds)
            mapped = apply_voi(ints, ds).astype(np.float64)
            lo, hi = float(entries.min()), float(entries.max())
        elif has_window and _linear_window(ds) is not None:
            # The common case (one LINEAR window) computed directly in float32: same result as the standard's
            # formula, several times faster than the general routine on large radiographs.
            c, w = _linear_window(ds)
            x = values.astype(np.float32, copy=False)
            return np.clip((x - np.float32(c - 0.5)) / np.float32(w - 1) + np.float32(0.5), 0.0, 1.0)
        elif has_window:
            mapped = apply_windowing(values, ds)
            with np.errstate(over="ignore"):
                lo, hi = (float(v) for v in apply_windowing(np.array([-1e300, 1e300]), ds))
        else:
            return None
    except Exception as exc:  # invalid window (width < 1, unknown function) or LUT: fall back to min-max
        log.warning("%s: unusable VOI (%s); using min-max", path, exc)
        return None
    if not hi > lo:
        return None
    return np.clip((mapped - lo) / (hi - lo), 0.0, 1.0)


def _modality(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT: a plain rescale in float32 (identity skipped: most radiographs carry slope 1, intercept 0),
    pydicom's general routine for a Modality LUT Sequence."""
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(stored, ds)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope == 1.0 and intercept == 0.0:
        return stored
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


@_warnings_to_log
def read_dicom(path: str | os.PathLike, voi: str = "voi") -> np.ndarray:
    """Display image as float32 (rows, cols) in [0, 1], air dark and bone bright.

    Applies the modality LUT (rescale or LUT), then ``voi='voi'``: the file's VOI LUT or window (min-max when it
    has none), or ``voi='minmax'``: min-max of the modality values; MONOCHROME1 is inverted last.
    """
    if voi not in ("voi", "minmax"):
        raise ValueError(f"voi={voi!r}: expected 'voi' or 'minmax'")
    ds, stored = _stored_pixels(path)
    try:
        values = _modality(stored, ds)
    except Exception as exc:
        raise DicomReadError(path, "corrupt", f"invalid modality LUT / rescale ({exc})") from None
    out = _voi_normalised(values, ds, path) if voi == "voi" else None
    if out is None:
        out = _minmax(values)
    if _str(ds, "PhotometricInterpretation").upper() == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def equalize_hist(image: np.ndarray) -> np.ndarray:
    """Histogram equalisation of a uint8 image with OpenCV ``cv2.equalizeHist`` semantics.

    LUT[v] = round((cdf[v] - cdf_min) * 255 / (N - cdf_min)) for v above the lowest occupied bin, computed in
    float32 and rounded half-to-even like OpenCV's saturate_cast; the lowest bin maps to 0, and a constant image
    is returned unchanged.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"equalize_hist needs a uint8 image, got {img.dtype}")
    if img.size == 0:
        return img.copy()
    hist = np.bincount(img.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    total = img.size
    if hist[first] == total:
        return img.copy()
    scale = np.float32(255.0) / np.float32(total - hist[first])
    cum = (np.cumsum(hist) - hist[first]).astype(np.float32)
    lut = np.clip(np.rint(cum * scale), 0, 255).astype(np.uint8)
    lut[: first + 1] = 0
    return lut[img]


@_warnings_to_log
def official_jpg_recipe(path: str | os.PathLike) -> np.ndarray:
    """uint8 image as MIMIC-CXR-JPG made it: min-max of the stored values to 0..255 (no windowing, no modality
    LUT), MONOCHROME1 inverted, OpenCV-style histogram equalisation (JPEG encoding at quality 95 is left to the
    caller). The inversion is done before rounding so MONOCHROME1/2 versions of one image give identical output.
    """
    ds, stored = _stored_pixels(path)
    scaled = _minmax(stored) * 255.0
    if _str(ds, "PhotometricInterpretation").upper() == "MONOCHROME1":
        scaled = 255.0 - scaled
    return equalize_hist(np.rint(scaled).astype(np.uint8))
