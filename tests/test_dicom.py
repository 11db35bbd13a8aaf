"""Tests for cxrsynth.data.dicom: phantom writer, reader of real DICOMs, error reasons, MIMIC-CXR-JPG recipe."""

from __future__ import annotations

import pickle
import re
import struct

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.sequence import Sequence

from cxrsynth.data.dicom import (
    IMPLEMENTATION_CLASS_UID,
    READ_REASONS,
    TRANSFER_SYNTAXES,
    DicomReadError,
    DicomSpec,
    display_to_stored,
    equalize_hist,
    make_uid,
    official_jpg_recipe,
    read_dicom,
    read_dicom_header,
    write_dicom,
)

LOSSLESS = ("explicit_le", "implicit_le", "rle", "jpeg2000_lossless")
ALL_TS = tuple(TRANSFER_SYNTAXES)
BITS = (10, 12, 15, 16)
MONO = ("MONOCHROME1", "MONOCHROME2")
DX_SOP = "1.2.840.10008.5.1.4.1.1.1.1"
CR_SOP = "1.2.840.10008.5.1.4.1.1.1"


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def pydicom_file(name: str) -> str:
    """A pydicom / pydicom-data test file, never downloaded."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} not available offline (pydicom-data missing?)")
    return path


def chest_like(rows: int = 64, cols: int = 56, seed: int = 0) -> np.ndarray:
    """A small display image (bright mediastinum, dark lungs, ribs, noise) spanning exactly [0, 1]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    u, v = 2 * x / (cols - 1) - 1, 2 * y / (rows - 1) - 1
    img = 0.45 + 0.35 * np.exp(-((u / 0.18) ** 2))
    for cx in (-0.5, 0.5):
        img -= 0.3 * (((u - cx) / 0.33) ** 2 + ((v + 0.05) / 0.6) ** 2 < 1)
    img += 0.05 * np.sin(v * 25) + 0.02 * rng.standard_normal((rows, cols))
    return (img - img.min()) / (img.max() - img.min())


def make_spec(**overrides) -> DicomSpec:
    rng = np.random.default_rng(1234)
    fields = dict(
        patient_name="PHANTOM^ALEX",
        patient_id="PH10000032",
        study_instance_uid=make_uid(rng),
        series_instance_uid=make_uid(rng),
        sop_instance_uid=make_uid(rng),
        study_date="21800506",
        study_time="080556.875000",
        accession_number="PHACC0001",
        patient_sex="F",
        patient_birth_date="21300101",
        patient_orientation_meaning="Erect",
    )
    fields.update(overrides)
    return DicomSpec(**fields)


def write(tmp_path, name="img.dcm", display=None, **spec_overrides):
    path = tmp_path / name
    write_dicom(path, chest_like() if display is None else display, make_spec(**spec_overrides))
    return path


def reason_of(path, fn=read_dicom) -> str:
    with pytest.raises(DicomReadError) as info:
        fn(path)
    assert str(path) in str(info.value)  # the message names the file
    assert info.value.reason in READ_REASONS
    return info.value.reason


def stored_of(path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


# ---------------------------------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["DX", "CR"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("photometric", MONO)
@pytest.mark.parametrize("ts", ALL_TS)
def test_round_trip(tmp_path, ts, photometric, bits, modality):
    display = chest_like()
    path = write(tmp_path, display=display, transfer_syntax=ts, photometric=photometric, bits_stored=bits,
                 modality=modality)
    out = read_dicom(path)
    assert out.dtype == np.float32 and out.shape == display.shape
    assert 0.0 <= out.min() and out.max() <= 1.0
    err = np.abs(out.astype(np.float64) - display)
    if ts in LOSSLESS:
        assert err.max() <= 0.5 / (2**bits - 1) + 1e-6  # quantisation only
    else:
        # JPEG 2000 at ~10:1 drops the pixel noise but keeps the picture
        assert err.mean() < 0.04 and np.corrcoef(out.ravel(), display.ravel())[0, 1] > 0.97
    # min-max VOI gives the same for an image that spans the full range
    assert np.abs(read_dicom(path, voi="minmax") - out).max() < (1e-6 if ts in LOSSLESS else 0.05)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("photometric", MONO)
def test_lossless_encodings_identical(tmp_path, photometric, bits):
    paths = {ts: write(tmp_path, f"{ts}.dcm", transfer_syntax=ts, photometric=photometric, bits_stored=bits)
             for ts in LOSSLESS}
    ref_stored, ref_display = stored_of(paths["explicit_le"]), read_dicom(paths["explicit_le"])
    for ts in LOSSLESS[1:]:
        assert np.array_equal(stored_of(paths[ts]), ref_stored), ts
        assert np.array_equal(read_dicom(paths[ts]), ref_display), ts
        assert np.array_equal(official_jpg_recipe(paths[ts]), official_jpg_recipe(paths["explicit_le"])), ts


@pytest.mark.parametrize("ts", ALL_TS)
def test_mono1_and_mono2_give_same_display(tmp_path, ts):
    p1 = write(tmp_path, "m1.dcm", transfer_syntax=ts, photometric="MONOCHROME1")
    p2 = write(tmp_path, "m2.dcm", transfer_syntax=ts, photometric="MONOCHROME2")
    s1, s2 = stored_of(p1).astype(int), stored_of(p2).astype(int)
    if ts in LOSSLESS:
        assert np.array_equal(s1, 4095 - s2)  # MONOCHROME1 stores the inverse
        assert np.allclose(read_dicom(p1), read_dicom(p2), atol=1e-6)
    else:
        assert np.abs(read_dicom(p1) - read_dicom(p2)).mean() < 0.01
    assert read_dicom(p1)[32, 28] > read_dicom(p1)[32, 14]  # mediastinum brighter than lung in both
    assert read_dicom(p2)[32, 28] > read_dicom(p2)[32, 14]


def test_display_to_stored():
    d = np.array([[0.0, 0.5], [1.0, 1.0 + 1e-9]])
    assert display_to_stored(d, 12, "MONOCHROME2").tolist() == [[0, 2048], [4095, 4095]]
    assert display_to_stored(d, 12, "MONOCHROME1").tolist() == [[4095, 2047], [0, 0]]
    assert display_to_stored(d, 16, "MONOCHROME2").dtype == np.uint16
    assert display_to_stored(d, 16, "MONOCHROME2").max() == 65535
    for bad in (np.array([[0.0, np.nan]]), np.array([[-0.1, 0.5]]), np.array([[0.0, 1.5]]), np.zeros((2, 2, 2)),
                np.zeros((2, 2), np.uint16)):
        with pytest.raises(ValueError):
            display_to_stored(bad, 12, "MONOCHROME2")
    with pytest.raises(ValueError, match="bits_stored"):
        display_to_stored(d, 9, "MONOCHROME2")
    with pytest.raises(ValueError, match="photometric"):
        display_to_stored(d, 12, "RGB")


# ---------------------------------------------------------------------------------------------------------------------
# written file attributes
# ---------------------------------------------------------------------------------------------------------------------


def test_dx_attributes(tmp_path):
    spec = make_spec(performed_procedure_description="CHEST (PA AND LAT)", bits_stored=12)
    path = tmp_path / "dx.dcm"
    write_dicom(path, chest_like(), spec)
    ds = pydicom.dcmread(path)
    assert ds.preamble == b"\0" * 128
    assert ds.SOPClassUID == DX_SOP == ds.file_meta.MediaStorageSOPClassUID
    assert ds.Modality == "DX" and ds.PresentationIntentType == "FOR PRESENTATION"
    assert list(ds.ImageType) == ["DERIVED", "PRIMARY"]
    for kw, value in [("StudyInstanceUID", spec.study_instance_uid), ("SeriesInstanceUID", spec.series_instance_uid),
                      ("SOPInstanceUID", spec.sop_instance_uid)]:
        assert ds[kw].value == value and value.startswith("2.25.")
    assert ds.file_meta.MediaStorageSOPInstanceUID == spec.sop_instance_uid
    assert ds.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert ds.PatientName == "PHANTOM^ALEX" and ds.PatientID == "PH10000032"  # kept for the leak checks
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert (ds.StudyDate, ds.StudyTime, ds.AccessionNumber) == ("21800506", "080556.875000", "PHACC0001")
    assert ds.ViewPosition == "PA"
    assert (ds.ViewCodeSequence[0].CodeValue, ds.ViewCodeSequence[0].CodeMeaning) == ("R-10214", "postero-anterior")
    assert ds.ViewCodeSequence[0].CodingSchemeDesignator == "SRT"
    assert (ds.PatientOrientationCodeSequence[0].CodeValue,
            ds.PatientOrientationCodeSequence[0].CodeMeaning) == ("F-10440", "Erect")
    assert ds.AnatomicRegionSequence[0].CodeValue == "T-D3000" and ds.BodyPartExamined == "CHEST"
    assert ds.ProcedureCodeSequence[0].CodeMeaning == "CHEST (PA AND LAT)"
    assert ds.PerformedProcedureStepDescription == "CHEST (PA AND LAT)"
    assert ds.ImageLaterality == "U" and ds.PositionerType and ds.AcquisitionContextSequence == Sequence([])
    assert ds.PresentationLUTShape == "IDENTITY"
    assert (ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (1, 16, 12,
                                                                                                         11, 0)
    assert (ds.Rows, ds.Columns) == (64, 56)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, 0.0)
    assert ds.LossyImageCompression == "00"
    # the window spans exactly the stored range (LINEAR: c - 0.5 -+ (w - 1) / 2)
    stored = ds.pixel_array
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    assert (c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2) == (stored.min(), stored.max())


def test_cr_attributes(tmp_path):
    ds = pydicom.dcmread(write(tmp_path, modality="CR", photometric="MONOCHROME1", bits_stored=10,
                               patient_orientation_meaning=""))
    assert ds.SOPClassUID == CR_SOP and ds.Modality == "CR"
    assert "PresentationIntentType" not in ds and "PatientOrientationCodeSequence" not in ds
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, 0.0)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 10 and ds.HighBit == 9
    assert "WindowCenter" in ds and "WindowWidth" in ds


@pytest.mark.parametrize(
    "view, code, meaning",
    [("PA", "R-10214", "postero-anterior"), ("AP", "R-10206", "antero-posterior"), ("LATERAL", "R-102CD", "lateral"),
     ("LL", "R-10236", "left lateral")],
)
def test_view_codes(tmp_path, view, code, meaning):
    ds = pydicom.dcmread(write(tmp_path, view_position=view, patient_orientation_meaning="Recumbent"))
    assert ds.ViewPosition == view
    assert (ds.ViewCodeSequence[0].CodeValue, ds.ViewCodeSequence[0].CodeMeaning) == (code, meaning)
    assert ds.PatientOrientationCodeSequence[0].CodeValue == "F-10450"


def test_unknown_view_has_empty_view_code_sequence(tmp_path):
    ds = pydicom.dcmread(write(tmp_path, view_position="SWIMMERS"))
    assert ds.ViewPosition == "SWIMMERS" and len(ds.ViewCodeSequence) == 0


def test_lossy_tags_and_j2k_precision(tmp_path):
    for bits in BITS:
        for ts in ("jpeg2000_lossless", "jpeg2000"):
            ds = pydicom.dcmread(write(tmp_path, f"{ts}{bits}.dcm", transfer_syntax=ts, bits_stored=bits))
            assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[ts]
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            siz = frame.find(b"\xff\x51")  # SIZ marker: component precision - 1 sits 40 bytes in
            assert siz > 0 and (frame[siz + 40] & 0x7F) + 1 == bits
            if ts == "jpeg2000":
                assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_15444_1"
                assert float(ds.LossyImageCompressionRatio) > 1
            else:
                assert ds.LossyImageCompression == "00" and "LossyImageCompressionRatio" not in ds


@pytest.mark.parametrize("ts", ALL_TS)
def test_deterministic_bytes(tmp_path, ts):
    a = write(tmp_path, "a.dcm", transfer_syntax=ts, photometric="MONOCHROME1", bits_stored=15)
    b = write(tmp_path, "b.dcm", transfer_syntax=ts, photometric="MONOCHROME1", bits_stored=15)
    assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_write_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"bad\.dcm.*\[0, 1\]"):
        write_dicom(tmp_path / "bad.dcm", np.full((4, 4), 2.0), make_spec())
    assert not (tmp_path / "bad.dcm").exists()


def test_make_uid():
    u1, u2 = make_uid(np.random.default_rng(7)), make_uid(np.random.default_rng(7))
    assert u1 == u2 and u1 != make_uid(np.random.default_rng(8))
    rng = np.random.default_rng(0)
    uids = {make_uid(rng) for _ in range(100)}
    assert len(uids) == 100
    for u in uids:
        assert re.fullmatch(r"2\.25\.[1-9][0-9]*", u) and len(u) <= 64


def test_spec_validation():
    for field, value in [("modality", "MR"), ("photometric", "RGB"), ("bits_stored", 8), ("transfer_syntax", "jpeg"),
                         ("sop_instance_uid", "2.25.01"), ("study_date", "2180-05-06"), ("study_time", "8:05"),
                         ("patient_sex", "X"), ("view_code_meaning", "swimmers"),
                         ("patient_orientation_meaning", "Prone"), ("lossy_ratio", 0.5),
                         ("view_position", "pa"), ("accession_number", "A" * 17), ("patient_id", "A\\B")]:
        with pytest.raises(ValueError, match=field):
            make_spec(**{field: value})


def test_header(tmp_path):
    path = write(tmp_path, view_position="AP", performed_procedure_description="CHEST (PORTABLE AP)",
                 patient_orientation_meaning="", transfer_syntax="rle", bits_stored=15)
    header = read_dicom_header(path)
    assert header == {
        "transfer_syntax": "1.2.840.10008.1.2.5",
        "sop_class_uid": DX_SOP,
        "modality": "DX",
        "view_position": "AP",
        "photometric": "MONOCHROME2",
        "rows": 64,
        "columns": 56,
        "bits_allocated": 16,
        "bits_stored": 15,
        "pixel_representation": 0,
        "number_of_frames": 1,
        "study_date": "21800506",
        "study_time": "080556.875000",
        "performed_procedure_description": "CHEST (PORTABLE AP)",
        "procedure_code_meaning": "CHEST (PORTABLE AP)",
        "view_code_meaning": "antero-posterior",
        "patient_orientation_meaning": "",
        "person_names": header["person_names"],
    }
    assert all(isinstance(n, str) and n for n in header["person_names"])


# ---------------------------------------------------------------------------------------------------------------------
# reader: VOI / modality LUT handling
# ---------------------------------------------------------------------------------------------------------------------


def test_window_clips_and_minmax_ignores_it(tmp_path):
    path = write(tmp_path, bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = "2048.5", "2048"  # the middle half of the range
    ds.save_as(path)
    stored = ds.pixel_array.astype(float)
    out = read_dicom(path)
    expected = np.clip((stored - 1024) / 2047, 0, 1)
    assert np.abs(out - expected).max() < 1e-3
    assert np.abs(read_dicom(path, voi="minmax") - chest_like()).max() < 1e-3


def test_rescale_then_window(tmp_path):
    path = write(tmp_path, bits_stored=12)
    ds = pydicom.dcmread(path)
    lo, hi = 2 * 0 - 1000, 2 * 4095 - 1000  # modality values
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-1000"
    ds.WindowCenter, ds.WindowWidth = f"{(lo + hi) / 2 + 0.5}", f"{hi - lo + 1}"
    ds.save_as(path)
    assert np.abs(read_dicom(path) - chest_like()).max() < 1e-3


def test_voi_lut_sequence(tmp_path):
    path = write(tmp_path, bits_stored=12, photometric="MONOCHROME1")
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]  # declares 16-bit entries, holds 12-bit ones (a common vendor quirk)
    item.add_new(0x00283006, "US", [int(round(np.sqrt(i / 4095) * 4095)) for i in range(4096)])
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(path)
    stored = pydicom.dcmread(path).pixel_array.astype(float)
    expected = 1 - np.round(np.sqrt(stored / 4095) * 4095) / 4095  # LUT on stored values, then MONOCHROME1 inverse
    assert np.abs(read_dicom(path) - expected).max() < 1e-6


def test_sigmoid_and_bad_window_fall_back(tmp_path):
    path = write(tmp_path, bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.VOILUTFunction = "SIGMOID"
    ds.save_as(path)
    out = read_dicom(path)
    order = np.argsort(chest_like().ravel())
    assert np.all(np.diff(out.ravel()[order]) >= -1e-6) and 0 <= out.min() and out.max() <= 1  # monotone
    ds.VOILUTFunction = "LINEAR"
    ds.WindowWidth = "0"  # invalid for LINEAR: fall back to min-max
    ds.save_as(path)
    assert np.abs(read_dicom(path) - chest_like()).max() < 1e-3


def test_unknown_voi_option(tmp_path):
    with pytest.raises(ValueError, match="voi"):
        read_dicom(write(tmp_path), voi="window")


@pytest.mark.parametrize("ts", ["implicit_le", "explicit_le"])
def test_bare_dataset_without_preamble(tmp_path, ts):
    path = write(tmp_path, transfer_syntax=ts)
    data = path.read_bytes()
    meta_end = 144 + struct.unpack("<I", data[140:144])[0]  # preamble + 'DICM' + group length element + meta
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(data[meta_end:])  # what old archives hold: the dataset alone
    assert np.array_equal(read_dicom(bare), read_dicom(path))
    assert read_dicom_header(bare)["transfer_syntax"] == TRANSFER_SYNTAXES[ts]


def test_damage_after_the_pixel_data_is_tolerated(tmp_path):
    path = write(tmp_path)
    ref = read_dicom(path)
    # a trailing padding element (FFFC,FFFC) OB declaring 100 bytes, cut after 10
    path.write_bytes(path.read_bytes() + struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, 100) + b"\0" * 10)
    assert np.array_equal(read_dicom(path), ref)


# ---------------------------------------------------------------------------------------------------------------------
# reader: real files
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_implicit.dcm",
     "MR_small_bigendian.dcm", "CT_small.dcm", "JPEG2000.dcm", "JPEG2000_UNC.dcm", "JPEG-LL.dcm", "JPGExtended.dcm",
     "vlut_04.dcm", "mlut_18.dcm", "emri_small.dcm"],
)
def test_pydicom_test_files_decode(name):
    path = pydicom_file(name)
    out = read_dicom(path)
    header = read_dicom_header(path)
    assert out.dtype == np.float32 and out.shape == (header["rows"], header["columns"])  # first frame if several
    assert np.isfinite(out).all() and 0 <= out.min() and out.max() <= 1 and out.std() > 0.01
    assert official_jpg_recipe(path).dtype == np.uint8


def test_pydicom_encodings_of_one_image_agree():
    ref = read_dicom(pydicom_file("MR_small.dcm"))
    for name in ("MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_implicit.dcm",
                 "MR_small_bigendian.dcm"):
        assert np.array_equal(read_dicom(pydicom_file(name)), ref), name
    assert np.array_equal(read_dicom(pydicom_file("JPEG2000.dcm")), read_dicom(pydicom_file("JPEG2000_UNC.dcm")))


@pytest.fixture(scope="module")
def chest_cr():
    """pydicom-data's PA chest CR (1955x1841, 15 bits, MONOCHROME1): raw, J2K lossless, J2K lossy, lossy decoded."""
    names = {"unc": "RG1_UNCR.dcm", "j2kr": "RG1_J2KR.dcm", "j2ki": "RG1_J2KI.dcm", "unci": "RG1_UNCI.dcm"}
    paths = {k: pydicom_file(n) for k, n in names.items()}
    return {k: (p, read_dicom(p)) for k, p in paths.items()}


def test_real_chest_header(chest_cr):
    for key, (path, _) in chest_cr.items():
        h = read_dicom_header(path)
        assert (h["modality"], h["view_position"], h["photometric"], h["bits_stored"]) == ("CR", "PA", "MONOCHROME1",
                                                                                            15), key
        assert (h["rows"], h["columns"]) == (1955, 1841)


def test_real_chest_encodings(chest_cr):
    ref = chest_cr["unc"][1]
    assert ref.shape == (1955, 1841) and ref.dtype == np.float32
    assert np.array_equal(chest_cr["j2kr"][1], ref)  # lossless
    assert np.abs(chest_cr["j2ki"][1] - ref).mean() < 0.005  # lossy, close
    assert np.array_equal(chest_cr["unci"][1], chest_cr["j2ki"][1])  # UNCI is the lossy image, stored raw


def regions(img: np.ndarray) -> tuple[float, float, float]:
    h, w = img.shape
    mean = lambda r0, r1, c0, c1: float(img[int(r0 * h):int(r1 * h), int(c0 * w):int(c1 * w)].mean())  # noqa: E731
    return mean(0.25, 0.6, 0.45, 0.55), mean(0.25, 0.5, 0.2, 0.35), mean(0.25, 0.5, 0.62, 0.78)


def test_real_chest_is_displayed_bone_bright(chest_cr):
    for key, (path, img) in chest_cr.items():
        centre, right_lung, left_lung = regions(img)
        assert centre > max(right_lung, left_lung) + 0.15, key  # mediastinum/spine bright, lungs dark
        centre, right_lung, left_lung = regions(read_dicom(path, voi="minmax"))
        assert centre > max(right_lung, left_lung) + 0.15, key


def test_real_chest_official_recipe(chest_cr):
    jpg = official_jpg_recipe(chest_cr["unc"][0])
    assert jpg.dtype == np.uint8 and jpg.shape == (1955, 1841)
    assert np.array_equal(jpg, official_jpg_recipe(chest_cr["j2kr"][0]))
    centre, right_lung, left_lung = regions(jpg / 255.0)
    assert centre > max(right_lung, left_lung) + 0.3  # MONOCHROME1 inverted
    fractions = np.bincount(jpg.ravel() // 32, minlength=8) / jpg.size
    assert np.all(np.abs(fractions - 1 / 8) < 0.03)  # equalised


# ---------------------------------------------------------------------------------------------------------------------
# reader: failures
# ---------------------------------------------------------------------------------------------------------------------


def test_garbage_is_corrupt(tmp_path):
    rng = np.random.default_rng(3)
    cases = {
        "garbage.dcm": rng.bytes(4096),
        "text.dcm": b"this is not a DICOM file\n" * 40,
        "fake_prefix.dcm": b"\0" * 128 + b"DICM" + rng.bytes(4096),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert reason_of(path) == "corrupt", name
        assert reason_of(path, read_dicom_header) == "corrupt", name
        assert reason_of(path, official_jpg_recipe) == "corrupt", name


@pytest.mark.parametrize("ts", ["explicit_le", "implicit_le", "rle", "jpeg2000_lossless", "jpeg2000"])
def test_truncated(tmp_path, ts):
    path = write(tmp_path, transfer_syntax=ts, display=chest_like(200, 180))
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: int(len(data) * 0.6)])  # inside the pixel data
    assert reason_of(cut) == "truncated"
    assert read_dicom_header(cut)["rows"] == 200  # the header itself is whole
    cut.write_bytes(data[:700])  # inside the header
    assert reason_of(cut) == "truncated"
    assert reason_of(cut, read_dicom_header) == "truncated"


def test_truncated_real_file(tmp_path):
    cut = tmp_path / "rg1_cut.dcm"
    cut.write_bytes(open(pydicom_file("RG1_J2KR.dcm"), "rb").read()[:60_000])
    assert reason_of(cut) == "truncated"


def test_empty_missing_and_directory(tmp_path):
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    assert reason_of(empty) == "empty_file"
    assert reason_of(tmp_path / "nope.dcm") == "missing_file"
    assert reason_of(tmp_path / "nope.dcm", read_dicom_header) == "missing_file"
    assert reason_of(tmp_path) == "missing_file"


def test_no_pixel_data(tmp_path):
    path = write(tmp_path)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    assert reason_of(path) == "no_pixel_data"
    assert read_dicom_header(path)["rows"] == 64


def test_not_monochrome():
    assert reason_of(pydicom_file("SC_rgb.dcm")) == "not_monochrome"
    assert reason_of(pydicom_file("SC_rgb.dcm"), official_jpg_recipe) == "not_monochrome"
    assert read_dicom_header(pydicom_file("SC_rgb.dcm"))["photometric"] == "RGB"


def test_unsupported_transfer_syntax(tmp_path):
    path = write(tmp_path, transfer_syntax="jpeg2000_lossless")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no image decoder exists
    ds.save_as(path)
    assert reason_of(path) == "unsupported_transfer_syntax"
    # a private transfer syntax pydicom has never heard of (same length, patched in place)
    data = path.read_bytes().replace(b"1.2.840.10008.1.2.4.100", b"1.3.6.1.4.1.99999.1.2.3", 1)
    path.write_bytes(data)
    assert reason_of(path) == "unsupported_transfer_syntax"


def test_broken_codestream_is_corrupt():
    # pydicom's JPEG-lossy.dcm has a malformed scan header that libjpeg rejects
    assert reason_of(pydicom_file("JPEG-lossy.dcm")) == "corrupt"


def test_error_is_picklable(tmp_path):
    with pytest.raises(DicomReadError) as info:
        read_dicom(tmp_path / "missing.dcm")
    clone = pickle.loads(pickle.dumps(info.value))
    assert (clone.reason, clone.path, str(clone)) == (info.value.reason, info.value.path, str(info.value))


@pytest.mark.parametrize("ts", ["explicit_le", "jpeg2000_lossless"])
def test_no_exception_escapes_on_damaged_files(tmp_path, ts):
    data = write(tmp_path, transfer_syntax=ts).read_bytes()
    rng = np.random.default_rng(5)
    damaged = tmp_path / "damaged.dcm"
    variants = [data[:n] for n in range(0, len(data), max(1, len(data) // 150))]
    for _ in range(60):  # random byte flips
        b = bytearray(data)
        for i in rng.integers(0, len(b), size=4):
            b[i] = int(rng.integers(0, 256))
        variants.append(bytes(b))
    for variant in variants:
        damaged.write_bytes(variant)
        for fn in (read_dicom, read_dicom_header, official_jpg_recipe):
            try:
                fn(damaged)
            except DicomReadError as exc:
                assert exc.reason in READ_REASONS


# ---------------------------------------------------------------------------------------------------------------------
# official MIMIC-CXR-JPG recipe
# ---------------------------------------------------------------------------------------------------------------------


def test_equalize_hist_known_values():
    assert equalize_hist(np.array([[0, 0, 1, 2]], np.uint8)).tolist() == [[0, 0, 128, 255]]  # 127.5 -> 128
    assert equalize_hist(np.array([[5, 5, 7, 9]], np.uint8)).tolist() == [[0, 0, 128, 255]]  # cdf_min removed
    # 255 / 6 = 42.5 rounds half to even, as OpenCV's cvRound does
    assert equalize_hist(np.array([[0, 1, 2, 2, 2, 2, 2]], np.uint8)).tolist() == [[0, 42, 255, 255, 255, 255, 255]]
    assert equalize_hist(np.array([[3, 3], [3, 3]], np.uint8)).tolist() == [[3, 3], [3, 3]]  # constant: unchanged
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(equalize_hist(ramp), ramp)  # already flat
    with pytest.raises(ValueError):
        equalize_hist(np.zeros((2, 2), np.uint16))


def test_official_recipe_tiny(tmp_path):
    display = np.array([[0.0, 1.0], [1.0, 0.0]])
    for pi in MONO:
        path = write(tmp_path, f"{pi}.dcm", display=display, photometric=pi)
        assert official_jpg_recipe(path).tolist() == [[0, 255], [255, 0]]


@pytest.mark.parametrize("ts", LOSSLESS)
def test_official_recipe_flat_and_mono_invariant(tmp_path, ts):
    p1 = write(tmp_path, "m1.dcm", display=chest_like(120, 100), transfer_syntax=ts, photometric="MONOCHROME1")
    p2 = write(tmp_path, "m2.dcm", display=chest_like(120, 100), transfer_syntax=ts, photometric="MONOCHROME2")
    j1, j2 = official_jpg_recipe(p1), official_jpg_recipe(p2)
    assert j1.dtype == np.uint8 and j1.shape == (120, 100)
    assert np.array_equal(j1, j2)
    fractions = np.bincount(j2.ravel() // 32, minlength=8) / j2.size
    assert np.all(np.abs(fractions - 1 / 8) < 0.04)
    assert j2[60, 50] > j2[60, 25]  # bright mediastinum, dark lung, no windowing involved
