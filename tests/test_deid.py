"""Report redaction: planted identifiers go, clinical wording stays."""
import pytest

from cxrsynth.text.deid import MASK, name_parts, redact

CLINICAL = [
    "FINDINGS: Moderate right pleural effusion with adjacent atelectasis. No pneumothorax.",
    "IMPRESSION: 1. Mild pulmonary edema. 2. Tip of the right IJ line in the SVC.",
    "Heart size is top normal. ET tube 4 cm above the carina. NG tube in the stomach.",
    "Compared to ___, the left lower lobe opacity is unchanged. Lung volumes are low.",
    "A 1.5 cm nodule in the right upper lobe. Dual-lead pacemaker; leads in the RA and RV.",
]


@pytest.mark.parametrize("text", CLINICAL)
def test_clinical_text_unchanged(text):
    assert redact(text, names=["DOE^JANE"]) == (text, 0)


@pytest.mark.parametrize("planted, gone", [
    ("Discussed with Dr. Hartwell by phone.", "Hartwell"),
    ("Call (617) 555-0199 with results.", "555-0199"),
    ("MRN: 88412337. No effusion.", "88412337"),
    ("Patient ID 4471-22 portable film.", "4471-22"),
    ("Study of 03/14/2015 compared.", "03/14/2015"),
    ("Sent to jane.doe@example.org.", "example.org"),
    ("SSN 123-45-6789.", "123-45-6789"),
])
def test_patterns(planted, gone):
    out, n = redact(planted)
    assert gone not in out and MASK in out and n >= 1


def test_header_names_any_case_whole_words():
    text = "Jane Doe, seen by DOE's team; Doeville is a place. jane returns."
    out, n = redact(text, names=["Doe^Jane", "SMITH^JOHN^Q"])
    assert "Jane" not in out and "jane" not in out and "Doe," not in out and "DOE" not in out
    assert "Doeville" in out and n == 4
    assert name_parts(["DOE^JANE^A", "", None, "O'NEIL^MARY-KATE"]) == ["MARY-KATE", "O'NEIL", "JANE", "DOE"]
