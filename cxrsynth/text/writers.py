"""Prompt writers: turn a PromptSpec into a radiology report (FINDINGS + IMPRESSION).

- `TemplateWriter` (default): offline and deterministic given the rng; radiologist-style sentences whose wording
  comes from the surface forms mined from the training reports (only forms the extractor reads back are used).
- `HFWriter`: a causal LM from a local folder (transformers), instructed with the sampled terms, as the paper does
  with GPT.
- `HTTPWriter`: an OpenAI-compatible chat-completions endpoint (off by default; the API key comes from an
  environment variable, never from params).
All writers return plain text; the structured terms stay with the prompt record whatever the writer writes.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxrsynth.text.findings import extract_findings
from cxrsynth.text.specs import PromptSpec, Term, Vocabulary, term_set

_AT = ("base", "bases", "angle", "angles", "hilum", "hila", "apex", "apices", "carina")
_ACRONYMS = {"picc", "ij", "et", "ng", "og", "svc", "icd", "cvc", "ett", "ivc", "ap", "pa"}
# anatomy that a pathology's name already carries: "cardiomegaly in the heart" says nothing new
_IMPLICIT = ("heart", "cardiac silhouette", "mediastinum", "lungs")
_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely", "minimal": "minimally"}


def _location(anatomy: str | None) -> str:
    if not anatomy or anatomy in _IMPLICIT:
        return ""
    prep = "at" if anatomy.split()[-1] in _AT else "in"
    return f" {prep} the {anatomy}"


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _plural(phrase: str) -> bool:
    last = phrase.split()[-1]
    return last.endswith("s") and not last.endswith(("sis", "ss", "us", "ax"))


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _case(sentence: str) -> str:
    """Mined forms are lower case: restore acronyms (PICC, IJ, ET, NG, SVC ...)."""
    return " ".join(w.upper() if w.lower().strip(".,") in _ACRONYMS else w for w in sentence.split(" "))


class TemplateWriter:
    """Composes sentences from mined surface forms; every form used is checked to be read back by the extractor."""

    name = "template"

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab
        self.forms: dict[str, list[tuple[str, int]]] = {}
        for p, e in vocab.pathologies.items():
            cands = sorted(e["surface"].items(), key=lambda kv: (-kv[1], kv[0]))
            ok = [(s, n) for s, n in cands if self._usable(p, s)]
            if not ok and self._usable(p, p):
                ok = [(p, 1)]
            self.forms[p] = ok

    @staticmethod
    def _usable(pathology: str, surface: str) -> bool:
        """A noun-phrase form that reads back as the pathology when asserted and when negated."""
        for sent, cert in ((f"There is {surface}.", "present"), (f"No {surface}.", "absent")):
            if term_set(extract_findings(sent)) != {(pathology, cert)}:
                return False
        return True

    def _form(self, p: str, rng: np.random.Generator) -> str:
        forms = self.forms.get(p) or [(p, 1)]
        w = np.array([n for _, n in forms], float)
        return forms[int(rng.choice(len(forms), p=w / w.sum()))][0]

    def sentence(self, t: Term, rng: np.random.Generator, surface: str | None = None) -> str:
        return _case(self._sentence(t, rng, surface or self._form(t.pathology, rng)))

    def _sentence(self, t: Term, rng: np.random.Generator, surf: str) -> str:
        loc = _location(t.anatomy)
        side = f"{t.side} " if t.side and not t.anatomy else ""
        if t.certainty == "absent":
            there = "There are no" if _plural(surf) else "There is no"
            return ("No {s}.", there + " {s}.", "No evidence of {s}.")[int(rng.integers(3))].format(s=surf)
        if t.certainty == "uncertain":
            phrase = f"{side}{surf}"
            k = int(rng.integers(3))
            if k == 0:
                return f"Possible {phrase}{loc}."
            if k == 1:
                return f"{_cap(phrase)}{loc} cannot be excluded."
            return f"Findings may represent {phrase}{loc}."
        sev = t.severity or ""
        if sev and surf.split()[0].endswith("ed"):  # "mildly enlarged cardiac silhouette", not "mild enlarged"
            sev = _ADVERB.get(sev, sev)
        phrase = f"{sev + ' ' if sev else ''}{side}{surf}"
        k = int(rng.integers(3))
        if k == 0:
            return _cap(phrase) + f"{loc}."
        if k == 1:
            return f"There are {phrase}{loc}." if _plural(phrase) else f"There is {_article(phrase)} {phrase}{loc}."
        return _cap(phrase) + (" are" if _plural(phrase) else " is") + f" seen{loc}."

    def write(self, spec: PromptSpec, rng: np.random.Generator) -> str:
        # one wording per finding, so FINDINGS and IMPRESSION describe the same device / lesion the same way
        surface = {t.pathology: self._form(t.pathology, rng) for t in spec.terms}
        findings = [self.sentence(t, rng, surface[t.pathology]) for t in spec.terms]
        positives = [t for t in spec.terms if t.certainty != "absent"]
        # A normal prompt restates its negatives: "normal chest radiograph" would imply absences nobody asked for.
        impression = [self.sentence(t, rng, surface[t.pathology]) for t in (positives or spec.terms)]
        return "FINDINGS: " + " ".join(findings) + "\n\nIMPRESSION: " + " ".join(impression)


def instruction(spec: PromptSpec) -> str:
    """The instruction handed to a language model: the terms to describe, one per line."""
    lines = []
    for t in spec.terms:
        words = [t.severity or "", t.side or "", t.pathology]
        desc = " ".join(w for w in words if w)
        if t.anatomy:
            desc += f" ({t.anatomy})"
        lines.append(f"- {desc}: {t.certainty}")
    return ("Write a chest X-ray radiology report with FINDINGS and IMPRESSION sections for a "
            f"{spec.view} view. Describe exactly these findings (present, absent or uncertain), "
            "with their anatomy, side and severity, in the style of a radiologist:\n" + "\n".join(lines) +
            "\nReport:\n")


class HFWriter:
    """A causal LM from a local folder (no hub access). Sampling is seeded per prompt."""

    name = "hf"

    def __init__(self, model_path: str | Path, max_new_tokens: int = 160, temperature: float = 0.7,
                 top_p: float = 0.95):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json: not a local transformers model folder")
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                          use_safetensors=True).eval()  # never a pickle
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p

    def write(self, spec: PromptSpec, rng: np.random.Generator) -> str:
        import torch

        torch.manual_seed(int(rng.integers(0, 2**31 - 1)))
        enc = self.tok(instruction(spec), return_tensors="pt")
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0,
                                      temperature=self.temperature if self.temperature > 0 else None,
                                      top_p=self.top_p, pad_token_id=pad)
        return self.tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


class HTTPWriter:
    """An OpenAI-compatible /chat/completions endpoint given in params; the key is read from an env variable."""

    name = "http"

    def __init__(self, url: str, model: str, api_key_env: str = "", temperature: float = 0.7,
                 max_tokens: int = 300, timeout: float = 60.0):
        if not url:
            raise ValueError("prompts.http_url: empty; the http writer needs an endpoint")
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.temperature, self.max_tokens, self.timeout = model, temperature, max_tokens, timeout
        self.key = os.environ.get(api_key_env, "") if api_key_env else ""

    def write(self, spec: PromptSpec, rng: np.random.Generator) -> str:
        body = {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "seed": int(rng.integers(0, 2**31 - 1)),
                "messages": [{"role": "system", "content": "You are a board-certified radiologist."},
                             {"role": "user", "content": instruction(spec)}]}
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"}
                                     | ({"Authorization": f"Bearer {self.key}"} if self.key else {}))
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                reply = json.loads(r.read().decode())
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as e:
            raise RuntimeError(f"{self.url}: request failed ({e})") from e
        try:
            return str(reply["choices"][0]["message"]["content"]).strip()
        except (KeyError, IndexError, TypeError) as e:
            raise RuntimeError(f"{self.url}: unexpected reply shape ({e})") from e


def make_writer(name: str, vocab: Vocabulary, **kw) -> TemplateWriter | HFWriter | HTTPWriter:
    if name == "template":
        return TemplateWriter(vocab)
    if name == "hf":
        return HFWriter(kw["hf_model_path"], kw.get("max_new_tokens", 160), kw.get("temperature", 0.7))
    if name == "http":
        return HTTPWriter(kw["http_url"], kw.get("http_model", ""), kw.get("http_api_key_env", ""),
                          kw.get("temperature", 0.7), kw.get("max_new_tokens", 300))
    raise ValueError(f"prompts.writer: unknown writer {name!r}")


def diversity(texts: Sequence[str], n: int = 3) -> dict[str, float]:
    """Phrasing diversity: distinct sentences / sentences, distinct word n-grams / n-grams."""
    sents = [s.strip() for t in texts for s in t.replace("\n", " ").split(".") if s.strip()]
    grams = [tuple(w[i:i + n]) for s in sents for w in [s.lower().split()] for i in range(max(0, len(w) - n + 1))]
    return {"distinct_sentences": round(len(set(sents)) / max(1, len(sents)), 4),
            f"distinct_{n}grams": round(len(set(grams)) / max(1, len(grams)), 4)}
