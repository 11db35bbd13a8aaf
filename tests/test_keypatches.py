"""Key-patch bank: deterministic selection rule, unknown terms, persistence."""
import pytest

from cxrsynth.keypatches import (BankError, KeyPatch, KeyPatchBank, key_side, mirror_key, term_keys, terms_from_json,
                                 terms_of_text)
from cxrsynth.text.specs import Term


def bank():
    kp = KeyPatch
    return KeyPatchBank((4, 4), 16, {
        "pleural effusion|left lung base": [kp(3, 3, 0, 0.9, "pleural effusion|left lung base"),
                                            kp(4, 3, 1, 0.8, "pleural effusion|left lung base")],
        "pleural effusion": [kp(5, 3, 3, 0.7, "pleural effusion"), kp(6, 3, 0, 0.6, "pleural effusion")],
        "cardiomegaly": [kp(7, 2, 1, 0.5, "cardiomegaly"), kp(8, 3, 1, 0.95, "cardiomegaly"),
                         kp(9, 2, 2, 0.4, "cardiomegaly")],
    })


def test_term_keys_most_specific_first():
    assert term_keys(Term("pleural effusion", anatomy="left lung base")) == [
        "pleural effusion|left lung base", "pleural effusion", "left lung base"]
    assert term_keys({"pathology": "edema"}) == ["edema"]
    # a lateralised term also has its pathology on that side, after the pair and before the plain pathology
    assert term_keys(Term("pneumothorax", anatomy="left apex", side="left")) == [
        "pneumothorax|left apex", "pneumothorax@left", "pneumothorax", "left apex"]
    assert term_keys({"pathology": "pneumothorax", "side": "right"}) == ["pneumothorax@right", "pneumothorax"]
    assert term_keys(Term("pleural effusion", side="bilateral")) == ["pleural effusion"]


def test_key_side_and_mirror_key():
    assert key_side("pneumothorax@left") == "left" and key_side("pneumothorax|right apex") == "right"
    assert key_side("right lower lobe") == "right" and key_side("retrocardiac") is None
    assert key_side("pleural effusion|pleural spaces") is None and key_side("pleural effusion@bilateral") is None
    assert key_side("opacity|right and left bases") is None  # both sides named: no single side
    assert key_side("rightward|heart") is None  # whole words only
    assert mirror_key("pneumothorax|left apex") == "pneumothorax|right apex"
    assert mirror_key("pneumothorax@right") == "pneumothorax@left"
    assert mirror_key("cardiomegaly") is None and mirror_key("opacity|right and left bases") is None
    for key in ("pneumothorax|left apex", "pneumothorax@right", "left lower lobe"):
        assert mirror_key(mirror_key(key)) == key


def test_round_robin_unique_positions_and_k():
    b = bank()
    terms = [Term("pleural effusion", anatomy="left lung base"), Term("cardiomegaly", anatomy="heart")]
    got = b.select(terms, 10)
    # entries are ranked by score; cardiomegaly's best (3,1) collides with effusion's second -> skipped
    assert [(p.row, p.col) for p in got] == [(3, 0), (3, 1), (2, 1), (2, 2)]
    assert [p.code for p in b.select(terms, 2)] == [3, 8]
    assert b.select(terms, 2) == b.select(list(terms), 2)  # deterministic
    assert b.select(terms, 0) == []


def test_fallback_negatives_and_unknown_terms():
    b = bank()
    assert [p.code for p in b.select([Term("pleural effusion", anatomy="right lung base")], 1)] == [5]
    assert b.select([Term("pleural effusion", "absent")], 5) == []
    assert b.select([Term("pneumothorax")], 5) == [] and b.select([], 5) == []
    assert [p.code for p in b.select([{"pathology": "cardiomegaly", "certainty": "uncertain"}], 1)] == [8]


def test_text_and_json_terms():
    terms = terms_of_text("Moderate left pleural effusion. No pneumothorax.")
    assert {(t.pathology, t.certainty) for t in terms} == {("pleural effusion", "present"), ("pneumothorax", "absent")}
    assert terms_from_json('[{"pathology": "edema", "certainty": "present", "extra": 1}]') == [Term("edema")]
    assert terms_from_json(None) == [] and terms_of_text("") == []


def test_save_load_identity_and_bytes(tmp_path):
    b = bank()
    p1 = b.save(tmp_path / "a")
    c = KeyPatchBank.load(tmp_path / "a")
    assert c.entries == b.entries and c.grid == b.grid
    p2 = c.save(tmp_path / "b" / "bank.json")
    assert p1.read_bytes() == p2.read_bytes()


def test_bad_banks(tmp_path):
    with pytest.raises(BankError, match="outside grid"):
        KeyPatchBank((2, 2), 4, {"x": [KeyPatch(0, 2, 0, 1.0, "x")]})
    with pytest.raises(BankError, match="outside codebook"):
        KeyPatchBank((2, 2), 4, {"x": [KeyPatch(4, 0, 0, 1.0, "x")]})
    with pytest.raises(BankError, match="missing"):
        KeyPatchBank.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(BankError, match="corrupted"):
        KeyPatchBank.load(tmp_path / "bad.json")
