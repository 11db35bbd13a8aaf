"""Anatomy-pathology prompting: vocabulary mining, coherent sampling, request validation, and the three writers."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from cxrsynth.config import FixtureParams
from cxrsynth.data.phantom.reports import write_report
from cxrsynth.data.phantom.sampler import sample_dataset
from cxrsynth.text.findings import extract_findings
from cxrsynth.text.specs import (PromptError, PromptSpec, Term, Vocabulary, mine_vocabulary, round_trip,
                                     sample_spec, spec_from_findings, term_set, validate_spec)
from cxrsynth.text.writers import HFWriter, HTTPWriter, TemplateWriter, diversity, instruction


@pytest.fixture(scope="module")
def reports():
    patients = sample_dataset(FixtureParams(cohort="t", sizes={"t": 150}), seed=11)
    out = []
    for p in patients:
        prior = None
        for s in p.studies:
            out.append(write_report(s, prior, p.anatomy, np.random.default_rng(s.study_id)).text)
            prior = s
    return out


@pytest.fixture(scope="module")
def vocab(reports):
    return mine_vocabulary([extract_findings(t) for t in reports], min_count=3)


def test_mined_vocabulary_counts_and_cooccurrence(vocab, reports):
    assert vocab.studies == len(reports)
    for term in ("pleural effusion", "cardiomegaly", "pneumothorax", "atelectasis"):
        assert term in vocab.pathologies, sorted(vocab.pathologies)
        e = vocab.pathologies[term]
        assert e["studies"] >= 3 and sum(e["surface"].values()) == e["mentions"] > 0
        assert set(e["certainty"]) <= {"present", "absent", "uncertain"}
    # effusions are described at lung bases / costophrenic angles, never at the trachea
    eff = vocab.cooccurrence["pleural effusion"]
    assert eff and not any("trachea" in a for a in eff)
    assert 0 < vocab.normal_studies < vocab.studies
    # the min_count cut is visible
    strict = mine_vocabulary([extract_findings(t) for t in reports], min_count=10_000)
    assert not strict.pathologies and strict.dropped
    assert Vocabulary.from_json(vocab.to_json()) == vocab


def test_sampled_specs_are_coherent_and_deterministic(vocab):
    for i in range(200):
        spec = sample_spec(vocab, np.random.default_rng(i), "prevalence", max_findings=4, max_negatives=2,
                           views={"PA": 0.6, "AP": 0.4})
        paths = [t.pathology for t in spec.terms]
        assert len(paths) == len(set(paths))  # never "large left effusion" together with "no effusion"
        assert len(spec.positive) <= 4 and len(spec.terms) - len(spec.positive) <= 2
        for t in spec.terms:
            if t.anatomy and t.certainty != "absent":
                assert t.anatomy in vocab.cooccurrence[t.pathology]
            if t.anatomy and t.side and t.anatomy.split()[0] in ("left", "right", "bilateral"):
                assert t.anatomy.startswith(t.side)
        assert spec.view in ("PA", "AP")
    a = sample_spec(vocab, np.random.default_rng(5))
    assert a == sample_spec(vocab, np.random.default_rng(5))


def test_balanced_mix_spreads_primary_pathologies(vocab):
    firsts = [next((t.pathology for t in sample_spec(vocab, np.random.default_rng(i), "balanced").terms
                    if t.certainty != "absent"), "") for i in range(400)]
    counts = {p: firsts.count(p) for p in set(firsts)}
    assert len(counts) >= 8
    assert max(counts.values()) < 0.25 * len(firsts)


def test_impossible_requests_name_the_term(vocab):
    with pytest.raises(PromptError, match="'dragon scales'"):
        validate_spec(vocab, PromptSpec((Term("dragon scales"),)))
    with pytest.raises(PromptError, match="'cardiomegaly'.*both"):
        validate_spec(vocab, PromptSpec((Term("cardiomegaly"), Term("cardiomegaly", "absent"))))
    with pytest.raises(PromptError, match="anatomy 'trachea'"):
        validate_spec(vocab, PromptSpec((Term("pleural effusion", anatomy="trachea"),)))
    side_anat = next(a for a in vocab.cooccurrence["pleural effusion"] if a.startswith(("left", "right")))
    other = "right" if side_anat.startswith("left") else "left"
    with pytest.raises(PromptError, match="contradicts"):
        validate_spec(vocab, PromptSpec((Term("pleural effusion", anatomy=side_anat, side=other),)))
    with pytest.raises(PromptError, match="'fairy dust'"):
        validate_spec(vocab, PromptSpec((Term("pleural effusion", anatomy="fairy dust"),)))


def test_template_writer_round_trips(vocab):
    writer = TemplateWriter(vocab)
    ok, texts = 0, []
    for i in range(150):
        rng = np.random.default_rng(i)
        spec = sample_spec(vocab, rng)
        text = writer.write(spec, rng)
        assert text.startswith("FINDINGS: ") and "\n\nIMPRESSION: " in text
        ok += round_trip(text, spec)
        texts.append(text)
    assert ok / 150 >= 0.95
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    spec = sample_spec(vocab, np.random.default_rng(9))
    assert writer.write(spec, rng1) == writer.write(spec, rng2)
    d = diversity(texts)
    assert d["distinct_sentences"] > 0.1 and d["distinct_3grams"] > 0.05


def test_paired_spec_from_a_report():
    text = "FINDINGS: Small right pleural effusion. No pneumothorax.\n\nIMPRESSION: Small right pleural effusion."
    spec = spec_from_findings(extract_findings(text), "AP")
    assert term_set(spec.terms) == {("pleural effusion", "present"), ("pneumothorax", "absent")}
    eff = next(t for t in spec.terms if t.pathology == "pleural effusion")
    assert eff.side == "right" and spec.view == "AP"


def _tiny_causal_lm(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["No pleural effusion .", "Small right pleural effusion .", "Write a chest X-ray report : present",
              "FINDINGS IMPRESSION heart size is normal", "cardiomegaly atelectasis pneumothorax - ( )"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    fast.save_pretrained(path)
    torch_model = GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_positions=256, n_embd=16, n_layer=1, n_head=2,
                                             eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id))
    torch_model.save_pretrained(path)


def test_hf_writer_loads_a_local_model_and_is_seeded(tmp_path):
    _tiny_causal_lm(tmp_path)
    writer = HFWriter(tmp_path, max_new_tokens=12, temperature=1.0)
    spec = PromptSpec((Term("pleural effusion", side="right", severity="small"), Term("pneumothorax", "absent")))
    a = writer.write(spec, np.random.default_rng(0))
    b = writer.write(spec, np.random.default_rng(0))
    c = writer.write(spec, np.random.default_rng(1))
    assert isinstance(a, str) and a and a == b
    assert a != c or writer.write(spec, np.random.default_rng(2)) != a
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFWriter(tmp_path / "nope")


def test_instruction_names_every_term():
    spec = PromptSpec((Term("pleural effusion", "present", "left costophrenic angle", "left", "small"),
                       Term("pneumothorax", "absent")), "AP")
    text = instruction(spec)
    assert "small left pleural effusion (left costophrenic angle): present" in text
    assert "pneumothorax: absent" in text and "AP view" in text


class _Stub(BaseHTTPRequestHandler):
    seen: list = []
    reply: bytes = b""

    def do_POST(self):  # noqa: N802 (http.server API)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append((self.path, self.headers.get("Authorization"), json.loads(body)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(type(self).reply)

    def log_message(self, *args):
        pass


def test_http_writer_speaks_openai_chat_completions(monkeypatch):
    srv = HTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        _Stub.reply = json.dumps({"choices": [{"message": {"content": " FINDINGS: Small left effusion. "}}]}).encode()
        monkeypatch.setenv("TEST_KEY", "sekret")
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        w = HTTPWriter(url, "radiology-llm", "TEST_KEY", temperature=0.2)
        spec = PromptSpec((Term("pleural effusion", side="left", severity="small"),))
        assert w.write(spec, np.random.default_rng(0)) == "FINDINGS: Small left effusion."
        path, auth, body = _Stub.seen[-1]
        assert path == "/v1/chat/completions" and auth == "Bearer sekret"
        assert body["model"] == "radiology-llm" and "pleural effusion" in body["messages"][-1]["content"]
        _Stub.reply = b'{"unexpected": true}'
        with pytest.raises(RuntimeError, match="unexpected reply"):
            w.write(spec, np.random.default_rng(0))
    finally:
        srv.shutdown()
    with pytest.raises(ValueError, match="http_url"):
        HTTPWriter("", "m")
