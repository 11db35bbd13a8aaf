"""Generator: tokenizer and layout, key patches chosen as at synthesis time, image-only loss, save -> load."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from cxrsynth.keypatches import KeyPatch, KeyPatchBank, terms_of_text
from cxrsynth.models.generator import (Generator, GeneratorError, ModelSpec, build_tokenizer, dropout_rows,
                                       image_loss, new_generator, sequence_batch, special_tokens,
                                       training_data)
from cxrsynth.train import TrainConfig

GRID, K = (4, 4), 16


TEXTS = ["FINDINGS: Moderate right pleural effusion.\n\nIMPRESSION: Right pleural effusion.",
         "FINDINGS: Severe cardiac enlargement.\n\nIMPRESSION: Cardiomegaly.",
         "FINDINGS: No acute process. Lungs are clear.",
         "FINDINGS: Small left pneumothorax at the apex.\n\nIMPRESSION: Left pneumothorax."] * 3


def tiny_bank() -> KeyPatchBank:
    return KeyPatchBank(GRID, K, {
        "pleural effusion": [KeyPatch(3, 3, 3, 0.9, "pleural effusion"), KeyPatch(4, 3, 2, 0.8, "pleural effusion")],
        "cardiomegaly": [KeyPatch(7, 2, 1, 0.7, "cardiomegaly")],
        "pneumothorax": [KeyPatch(9, 0, 0, 0.6, "pneumothorax")]})


def tiny_generator(k: int = 2, arch: str = "gpt_neox", max_text: int = 12, seed: int = 0) -> Generator:
    tok = build_tokenizer(TEXTS, 60, GRID, K)
    return new_generator(ModelSpec(arch=arch, d_model=16, n_layers=1, n_heads=2), tok, grid=GRID, codebook_size=K,
                         key_patches=k, max_text_tokens=max_text, bank=tiny_bank(), seed=seed)


def test_tokenizer_is_deterministic_and_holds_contiguous_special_tokens():
    a, b = build_tokenizer(TEXTS, 60, GRID, K), build_tokenizer(list(reversed(TEXTS)), 60, GRID, K)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    ids = a.convert_tokens_to_ids(special_tokens(GRID, K))
    pos0, img0 = a.convert_tokens_to_ids("<pos_0>"), a.convert_tokens_to_ids("<img_0>")
    assert ids[-K:] == list(range(img0, img0 + K)) and ids[-K - 16:-K] == list(range(pos0, pos0 + 16))
    assert len(set(ids)) == len(ids)


def test_layout_places_text_key_patches_view_and_image_start():
    gen = tiny_generator(k=2)
    lay = gen.layout
    kps = gen.key_patches(terms_of_text(TEXTS[0]))
    assert [(kp.row, kp.col, kp.code) for kp in kps] == [(3, 3, 3), (3, 2, 4)]   # bank.select, best first
    ids, mask = gen.encode_prompt(TEXTS[0], kps, "AP")
    assert len(ids) == len(mask) == lay.prompt_len == lay.max_text_tokens + 2 + 2 * 2 + 2
    assert ids[-1] == lay.img_id and ids[-2] == lay.view_id("AP") and ids[-2] != lay.view_id("PA")
    assert ids[-3] == lay.kp_end_id
    assert ids[-8:-3] == [lay.kp_id, lay.pos_offset + 15, lay.img_offset + 3, lay.pos_offset + 14, lay.img_offset + 4]
    n_real = sum(mask)
    assert mask == [0] * (len(mask) - n_real) + [1] * n_real                  # left padding, masked out
    assert all(i == lay.pad_id for i, m in zip(ids, mask) if m == 0)
    assert lay.view_id("weird") == lay.view_ids["<view_other>"]


def test_no_key_patches_really_changes_what_the_model_sees():
    with_kp, without = tiny_generator(k=2), tiny_generator(k=0)
    kps = with_kp.key_patches(terms_of_text(TEXTS[0]))
    a, _ = with_kp.encode_prompt(TEXTS[0], kps, "PA")
    b, _ = without.encode_prompt(TEXTS[0], without.key_patches(terms_of_text(TEXTS[0])), "PA")
    lay = without.layout
    assert without.key_patches(terms_of_text(TEXTS[0])) == []
    assert lay.kp_id not in b and not any(lay.pos_offset <= i < lay.pos_offset + 16 for i in b)
    assert with_kp.layout.kp_id in a and len(b) == len(a) - 6


def test_training_key_patches_are_the_synthesis_ones_and_unknown_terms_give_none():
    gen = tiny_generator(k=2)
    tokens = np.arange(len(TEXTS) * 16).reshape(-1, 4, 4) % K
    data = training_data(gen, TEXTS, ["PA"] * len(TEXTS), tokens, terms_of_text)
    for i, text in enumerate(TEXTS):
        kps = gen.bank.select(terms_of_text(text), 2)
        assert data.prompt[i].tolist() == gen.encode_prompt(text, kps, "PA")[0]
        assert data.n_key_patches[i] == len(kps)
    assert data.n_key_patches[2] == 0                                          # "no acute process": no known term
    assert (data.codes[1] == torch.from_numpy(tokens[1].reshape(-1))).all()
    lay = gen.layout
    unc = data.uncond[0].tolist()
    assert unc == gen.unconditional_prompt("PA")[0] and unc[-2:] == [lay.view_id("PA"), lay.img_id]
    assert set(unc[:-4]) == {lay.pad_id}


def test_key_patch_codes_from_the_training_image_bank_or_a_seeded_mix():
    """`image`: the bank's cells with the training image's own codes there (positions as at synthesis); `bank`: the
    bank's codes; `mix`: per image one or the other, the same for the same seed; stats give the mismatch."""
    gen = tiny_generator(k=2)
    lay = gen.layout
    tokens = (np.arange(len(TEXTS) * 16).reshape(-1, 4, 4) * 7 + 3) % K
    stats_bank, stats_image = {}, {}
    bank = training_data(gen, TEXTS, ["PA"] * len(TEXTS), tokens, terms_of_text, stats=stats_bank)
    own = training_data(gen, TEXTS, ["PA"] * len(TEXTS), tokens, terms_of_text, key_patch_codes="image",
                        stats=stats_image)
    changed = 0
    for i, text in enumerate(TEXTS):
        kps = gen.bank.select(terms_of_text(text), 2)
        mine = [dataclasses.replace(kp, code=int(tokens[i][kp.row, kp.col])) for kp in kps]
        assert own.prompt[i].tolist() == gen.encode_prompt(text, mine, "PA")[0]
        assert bank.prompt[i].tolist() == gen.encode_prompt(text, kps, "PA")[0]
        changed += any(m.code != kp.code for m, kp in zip(mine, kps))
        # the block's positions are the bank's in both: only the code tokens may differ
        pos = [t for t in own.prompt[i].tolist() if lay.pos_offset <= t < lay.pos_offset + 16]
        assert pos == [t for t in bank.prompt[i].tolist() if lay.pos_offset <= t < lay.pos_offset + 16]
    assert changed > 0 and stats_bank["key_patches"] == stats_image["key_patches"] == int(bank.n_key_patches.sum())
    assert 0 < stats_bank["image_code_differs"] == stats_image["image_code_differs"] <= 1
    assert stats_bank["own_codes_share"] == 0.0 and stats_image["own_codes_share"] == 1.0
    mix = [training_data(gen, TEXTS * 4, ["PA"] * len(TEXTS) * 4, np.concatenate([tokens] * 4), terms_of_text,
                         key_patch_codes="mix", seed=s) for s in (0, 0, 1)]
    assert torch.equal(mix[0].prompt, mix[1].prompt) and not torch.equal(mix[0].prompt, mix[2].prompt)
    with pytest.raises(ValueError, match="key_patch_codes"):
        training_data(gen, TEXTS, ["PA"] * len(TEXTS), tokens, terms_of_text, key_patch_codes="nearest")


def test_loss_is_on_image_tokens_only():
    gen = tiny_generator(k=2)
    lay = gen.layout
    tokens = np.random.default_rng(0).integers(0, K, (3, 4, 4))
    data = training_data(gen, TEXTS[:3], ["PA"] * 3, tokens, terms_of_text)
    batch = sequence_batch(lay, data.prompt, data.mask, data.codes)
    assert batch["ids"].shape == (3, lay.seq_len)
    loss = image_loss(gen.model, batch, lay)
    logits = gen.logits(batch["ids"], batch["mask"])
    ref = torch.nn.functional.cross_entropy(logits[:, lay.prompt_len - 1:-1].reshape(-1, logits.shape[-1]),
                                            (data.codes.long() + lay.img_offset).reshape(-1))
    torch.testing.assert_close(loss, ref)
    # the text does not enter the loss as a target: changing it changes the loss only through the context
    assert torch.isfinite(loss)


def test_prompt_dropout_rows_are_a_pure_function_of_seed_and_step():
    a, b = dropout_rows(0, 5, 1000, 0.1), dropout_rows(0, 5, 1000, 0.1)
    assert torch.equal(a, b) and 50 < int(a.sum()) < 150
    assert not torch.equal(a, dropout_rows(0, 6, 1000, 0.1))
    assert not dropout_rows(0, 5, 100, 0.0).any()


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_save_load_gives_identical_logits(tmp_path, arch):
    gen = tiny_generator(k=2, arch=arch)
    gen.model.eval()
    ids, mask = gen.encode_prompt(TEXTS[1], gen.key_patches(terms_of_text(TEXTS[1])), "PA")
    ids = torch.tensor([ids + [gen.layout.img_offset + 5] * 3])
    mask = torch.tensor([mask + [1] * 3])
    with torch.no_grad():
        before = gen.logits(ids, mask)
    gen.save(tmp_path / "g", extra={"vqgan_sha256": "abc"})
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "bank.json",
              "generator.json"):
        assert (tmp_path / "g" / f).is_file(), f
    back = Generator.load(tmp_path / "g")
    with torch.no_grad():
        after = back.logits(ids, mask)
    assert torch.equal(before, after)
    assert back.layout == gen.layout and back.meta["vqgan_sha256"] == "abc"
    assert back.bank.to_dict() == gen.bank.to_dict()
    gc = json.loads((tmp_path / "g" / "generation_config.json").read_text())
    assert gc["max_new_tokens"] == 16


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(GeneratorError, match="generator.json"):
        Generator.load(tmp_path)
    (tmp_path / "generator.json").write_text("{nope")
    with pytest.raises(GeneratorError, match="corrupted"):
        Generator.load(tmp_path)


def plain_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_pretrained_path_extends_the_vocabulary(tmp_path):
    base = tiny_generator(k=0)                      # stands in for a local pretrained LM + tokenizer
    plain = plain_tokenizer()                       # a text-only tokenizer, as a pretrained LLM has
    base.model.save_pretrained(tmp_path / "llm")
    plain.save_pretrained(tmp_path / "llm")
    gen = new_generator(ModelSpec(), None, grid=GRID, codebook_size=K, key_patches=2, max_text_tokens=6,
                        bank=tiny_bank(), seed=0, pretrained_path=str(tmp_path / "llm"))
    assert gen.model.get_input_embeddings().weight.shape[0] == len(gen.tokenizer) > len(plain)
    ids, _ = gen.encode_prompt(TEXTS[0], gen.key_patches(terms_of_text(TEXTS[0])), "PA")
    assert max(ids) < len(gen.tokenizer)


def test_a_few_steps_of_training_lower_the_loss(tmp_path):
    from cxrsynth.models.generator import fit

    gen = tiny_generator(k=2)
    tokens = np.stack([np.full((4, 4), i % 4) for i in range(len(TEXTS))])  # each report -> its own flat image
    data = training_data(gen, TEXTS, ["PA"] * len(TEXTS), tokens, terms_of_text)
    batch = sequence_batch(gen.layout, data.prompt, data.mask, data.codes)
    with torch.no_grad():
        before = float(image_loss(gen.model, batch, gen.layout))
    cfg = TrainConfig(max_steps=12, lr=2e-2, device="cpu", progress=False, eval_every=12, select_metric="loss",
                      select_mode="min", log_every=0)
    res = fit(gen, data, data, cfg, batch_size=12, prompt_dropout=0.0, seed=0)
    assert res.history[-1]["loss"] < 0.7 * before
