"""Report sectioning follows the official MIT-LCP algorithm, including its edge cases."""
import numpy as np
import pytest

from cxrsynth.text.sections import conclusion, normalize_name, section_report, split_sections

TYPICAL = (
    "                                 FINAL REPORT\n"
    " EXAMINATION:  CHEST (PA AND LAT)\n"
    " \n"
    " INDICATION:  ___F with new onset ascites  // eval for infection\n"
    " \n"
    " TECHNIQUE:  Chest PA and lateral\n"
    " \n"
    " COMPARISON:  None.\n"
    " \n"
    " FINDINGS: \n"
    " \n"
    " There is no focal consolidation, pleural effusion or pneumothorax.  The\n"
    " cardiomediastinal silhouette is normal.\n"
    " \n"
    " IMPRESSION: \n"
    " \n"
    " No acute cardiopulmonary process.\n"
)


def test_typical_report():
    s = section_report(TYPICAL)
    assert [x.name for x in split_sections(TYPICAL)] == [
        "preamble", "examination", "indication", "technique", "comparison", "findings", "impression"]
    assert s["impression"] == "No acute cardiopulmonary process."
    assert s["findings"].startswith("There is no focal consolidation") and s["findings"].endswith("normal.")
    assert s["indication"] == "___F with new onset ascites  // eval for infection"
    assert conclusion(TYPICAL) == ("impression", "No acute cardiopulmonary process.")


def test_typo_headers_and_synonyms_fold():
    text = TYPICAL.replace("IMPRESSION:", "IMPRESSON:").replace("FINDINGS:", "FINDNGS:").replace(
        "COMPARISON:", "COMPARISION:")
    s = section_report(text)
    assert s["impression"] == "No acute cardiopulmonary process."
    assert "findings" in s and "comparison" in s
    assert normalize_name("CONCLUSION") == "impression"
    assert normalize_name("REASON FOR EXAM") == "indication"
    assert normalize_name("FINDINGS AND IMPRESSION") == "impression"
    assert normalize_name("CHEST, PA AND LATERAL") == "findings"  # a view description means findings
    assert normalize_name("PRIOR ADDENDUM NOTE") == "addendum"
    assert normalize_name("SOMETHING ELSE") == "something else"


def test_no_impression_uses_findings_and_no_findings_uses_impression():
    no_imp = TYPICAL[: TYPICAL.index(" IMPRESSION:")]
    assert conclusion(no_imp)[0] == "findings"
    no_find = TYPICAL.replace(TYPICAL[TYPICAL.index(" FINDINGS:"): TYPICAL.index(" IMPRESSION:")], "")
    assert "findings" not in section_report(no_find)
    assert conclusion(no_find)[0] == "impression"


def test_empty_impression_is_dropped():
    text = TYPICAL.replace(" No acute cardiopulmonary process.\n", " \n")
    s = section_report(text)
    assert "impression" not in s
    assert conclusion(text)[0] == "findings"


def test_headerless_report_gives_last_paragraph():
    text = (" PA and lateral views of the chest.\n \n The heart is normal in size.  The lungs are clear.\n"
            " \n No acute process.\n")
    secs = split_sections(text)
    assert [s.name for s in secs] == ["full report", "last_paragraph"]
    assert secs[0].text == " PA and lateral views of the chest."
    # everything after the first blank line is the last paragraph, as in the official parser
    assert conclusion(text) == ("last_paragraph", "The heart is normal in size.  The lungs are clear.\n \n "
                                                  "No acute process.")
    assert text[secs[1].start:].startswith(" The heart")


def test_addendum_above_underscore_line_does_not_become_the_conclusion():
    text = ("                                 FINAL ADDENDUM\n ADDENDUM:  Findings were discussed with Dr. ___.\n"
            " \n ______________________________________________________________________________\n" + TYPICAL)
    s = section_report(text)
    assert s["addendum"].startswith("Findings were discussed")
    assert conclusion(text) == ("impression", "No acute cardiopulmonary process.")


def test_header_must_start_a_line():
    text = "\n FINDINGS:  Heart normal.  NOTE: not a header.\n lower case: not a header either.\n"
    secs = split_sections(text)
    assert [s.name for s in secs] == ["preamble", "findings"]
    assert "NOTE: not a header" in secs[1].text and "lower case" in secs[1].text


def test_comparison_is_the_last_resort():
    text = "                                 FINAL REPORT\n COMPARISON:  Unchanged from ___.\n"
    assert conclusion(text) == ("comparison", "Unchanged from ___.")
    assert conclusion("") == (None, "")


def test_phantom_reports_section_as_their_writer_intended():
    """Cross-check: the writer's label section is what the official algorithm selects, for every style."""
    from cxrsynth.config import FixtureParams
    from cxrsynth.data.phantom.reports import write_report
    from cxrsynth.data.phantom.sampler import sample_dataset

    patients = sample_dataset(FixtureParams(cohort="tiny", sizes={"tiny": 60}), seed=5)
    styles = set()
    for p in patients:
        prior = None
        for s in p.studies:
            rep = write_report(s, prior, p.anatomy, np.random.default_rng(s.study_id))
            name, text = conclusion(rep.text)
            assert name == rep.label_section, (s.report_style, name, rep.label_section)
            flat = " ".join(text.split())
            for st in rep.sections[rep.label_section]:
                assert " ".join(st.text.split()) in flat, (s.report_style, st.text)
            styles.add(s.report_style)
            prior = s
    assert len(styles) >= 6


@pytest.mark.parametrize("text", ["", " ", "\n", "IMPRESSION: lower-left header at start", "x" * 10000])
def test_odd_inputs_do_not_crash(text):
    sections = section_report(text)
    found = {k: v for k, v in sections.items() if v}
    if not text.strip():
        assert found == {}                                # nothing in, nothing out
    else:
        # every section is text of the report (nothing invented), and a report always yields something to read
        flat = " ".join(text.split())
        assert found and all(" ".join(v.split()) in flat for v in found.values()), found
    assert section_report(text) == sections               # deterministic
