"""Toy data shared by several test modules (not a test module itself): the classifier's labelled squares, the
alignment toy set (each report's finding drawn as one code at fixed cells of a 4 x 4 token grid), and a tiny BERT
saved to a local folder."""
import numpy as np
import torch

from cxrsynth.models.text_encoders import wordpiece_vocab
from cxrsynth.models.align_training import Pairs
from cxrsynth.data.arrays import LabeledImages
from cxrsynth.config import BankParams
from cxrsynth.keypatches import build_bank

NAN = np.nan


def labeled_squares(n: int, seed: int) -> LabeledImages:
    """Bright square top-left = label 0 present, bright bar at the bottom = label 1; the rest blank or uncertain."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, size=(n, 32, 32)).astype(np.uint8)
    labels = np.full((n, 14), NAN)
    has0, has1 = rng.random(n) < 0.5, rng.random(n) < 0.5
    x[has0, 4:12, 4:12] = 230
    x[has1, 26:30, 6:26] = 200
    labels[:, 0], labels[:, 1] = has0.astype(float), np.where(has1, 1.0, NAN)
    labels[::5, 2] = -1.0
    return LabeledImages(x, labels)


WORDS = ["there", "is", "a", "right", "left", "pleural", "effusion", "pneumothorax", "the", "heart", "enlarged",
         "lungs", "are", "clear", "no", "findings", "impression", "moderate", "cardiomegaly"]
H = W = 4
KINDS = {  # text -> (code, cells)
    "FINDINGS: There is a right pleural effusion.": (10, [(3, 0), (3, 1), (2, 0)]),
    "FINDINGS: There is a left pneumothorax.": (12, [(0, 3), (0, 2), (1, 3)]),
    "FINDINGS: The heart is enlarged. Moderate cardiomegaly.": (14, [(1, 1), (1, 2), (2, 1), (2, 2)]),
    "FINDINGS: The lungs are clear.": (None, []),
}


def toy_pairs(n_per: int, seed: int) -> Pairs:
    """n_per copies of every KINDS report, each with a grid of background codes 0..5 and the finding's code at its
    cells; groups = the report's kind."""
    rng = np.random.default_rng(seed)
    texts, grids = [], []
    for _ in range(n_per):
        for text, (code, cells) in KINDS.items():
            g = rng.integers(0, 6, size=(H, W))
            for r, c in cells:
                g[r, c] = code
            texts.append(text)
            grids.append(g)
    return Pairs(texts, np.asarray(grids, np.uint16), np.arange(len(texts)) % len(KINDS))


def save_tiny_bert(path):
    """A 1-layer BERT with a WordPiece vocabulary of WORDS, saved (model + tokenizer) to the folder `path`; returns
    (model in eval mode, tokenizer)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = wordpiece_vocab([" ".join(WORDS) + " . ,"], 200)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, unk_token="[UNK]",
                            pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    assert len(tok) == len(vocab)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=64), add_pooling_layer=False)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return model.eval(), tok


def old_rule_bank(model, texts, grids, *, strata=None, **settings):
    """build_bank under the rule the bank tests were written for (`both` in patch space, view strata only when
    labels are given); any `align.bank` key can be overridden."""
    base = {"rule": "both", "space": "patches", "strata": "none" if strata is None else "view"}
    return build_bank(model, texts, grids, BankParams(**{**base, **settings}), strata=strata)
