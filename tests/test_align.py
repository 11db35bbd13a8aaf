"""Alignment model: the FILIP loss, the text encoder from a local folder, training on a toy set, the key-patch
bank, save/load, retrieval and pointing helpers."""
import dataclasses
import json
import socket

import numpy as np
import pytest
import torch
from toys import KINDS, H, W, save_tiny_bert, toy_pairs, old_rule_bank

from cxrsynth.config import AlignParams, BankParams, ConfigError, params_from_dict
from cxrsynth.keypatches import KeyPatchBank, terms_of_text
from cxrsynth.models.align import AlignModel, contrastive_loss, filip_similarity
from cxrsynth.models.text_encoders import basic_words, load_text_encoder, wordpiece_vocab
from cxrsynth.models.align_training import Pairs, fit, retrieval_metrics
from cxrsynth.eval.alignment import PointingCase, pointing_metrics, region_cells, top_positions
from cxrsynth.text.sections import report_text


def _norm(x):
    return torch.nn.functional.normalize(x, dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# the loss

def test_filip_similarity_known_value():
    # one text with two words, one image with two patches, 2-d embeddings
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    p = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])
    # words' best patch: 1.0 and 0.8 -> 0.9; patches' best word: 1.0 and 0.8 -> 0.9
    s = filip_similarity(t, torch.ones(1, 2), p)
    assert s.shape == (1, 1) and s.item() == pytest.approx(0.9)
    # mask the second word: word side 1.0, patch side (1.0 + 0.6) / 2 = 0.8 -> 0.9 again, but from other terms
    s = filip_similarity(t, torch.tensor([[1.0, 0.0]]), p)
    assert s.item() == pytest.approx(0.5 * (1.0 + 0.8))


def test_contrastive_loss_is_symmetric_and_masks_padding():
    g = torch.Generator().manual_seed(0)
    t = _norm(torch.randn(4, 5, 8, generator=g))
    p = _norm(torch.randn(4, 6, 8, generator=g))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    sim = filip_similarity(t, mask, p)
    assert contrastive_loss(sim, 14.3).item() == pytest.approx(contrastive_loss(sim.t(), 14.3).item(), abs=1e-6)
    # padding: whatever sits in masked positions changes nothing
    t2 = t.clone()
    t2[~mask] = _norm(torch.randn(int((~mask).sum()), 8, generator=g))
    assert torch.allclose(filip_similarity(t2, mask, p), sim, atol=1e-6)
    # appending extra padded words changes nothing either
    t3 = torch.cat([t, _norm(torch.randn(4, 3, 8, generator=g))], 1)
    m3 = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], 1)
    assert torch.allclose(filip_similarity(t3, m3, p), sim, atol=1e-6)
    # pairwise = the diagonal of the matrix
    assert torch.allclose(filip_similarity(t, mask, p, pairwise=True), sim.diagonal(), atol=1e-6)


def test_perfect_pairs_score_above_shuffled_pairs():
    g = torch.Generator().manual_seed(1)
    p = _norm(torch.randn(6, 16, 32, generator=g))
    t = p[:, :5] + 0.05 * torch.randn(6, 5, 32, generator=g)  # each text's words describe 5 of its image's patches
    t = _norm(t)
    sim = filip_similarity(t, torch.ones(6, 5), p)
    diag = sim.diagonal()
    off = sim[~torch.eye(6, dtype=torch.bool)].reshape(6, 5)
    assert (diag[:, None] > off).all()
    shuffled = sim[:, torch.roll(torch.arange(6), 1)]
    assert contrastive_loss(sim, 10.0) < contrastive_loss(shuffled, 10.0)


# ---------------------------------------------------------------------------------------------------------------
# a tiny BERT in a local folder

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bert")
    return path, *save_tiny_bert(path)


def test_text_encoder_loads_from_a_local_folder_without_network(tiny_bert, monkeypatch):
    path, ref, _ = tiny_bert

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    enc, tok = load_text_encoder(path)
    ids = tok(["there is a right pleural effusion ."], return_tensors="pt")
    assert tok.unk_token_id not in ids["input_ids"][0].tolist()  # the saved vocabulary, not [UNK] everywhere
    with torch.no_grad():
        assert torch.equal(enc(**ids).last_hidden_state, ref(**ids).last_hidden_state)
    with pytest.raises(ValueError, match="config.json missing"):
        load_text_encoder(path / "nowhere")


def test_scratch_tokenizer_uses_its_vocabulary(tmp_path):
    from cxrsynth.models.text_encoders import scratch_text_encoder

    texts = ["Right pleural effusion.", "No pneumothorax; heart enlarged."]
    enc, tok = scratch_text_encoder(texts, vocab_size=80, hidden=16, layers=1, heads=2, max_length=32,
                                    workdir=tmp_path)
    ids = tok(["right pleural effusion"])["input_ids"][0]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "right", "pleural", "effusion", "[SEP]"]
    assert enc.config.vocab_size == len(tok)
    unseen = tok(["heal"])["input_ids"][0][1:-1]  # a word outside the vocabulary: its characters, not [UNK]
    assert tok.unk_token_id not in unseen and tok.convert_ids_to_tokens(unseen) == ["h", "##e", "##a", "##l"]


def test_wordpiece_vocab_is_deterministic_and_covers_every_character():
    texts = ["Right pleural effusion.", "No pneumothorax; heart enlarged."]
    v = wordpiece_vocab(texts, 60)
    assert v == wordpiece_vocab(list(texts), 60) and len(v) == len(set(v)) <= 60
    assert v[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for c in "".join(basic_words(" ".join(texts))):
        assert c in v and f"##{c}" in v


# ---------------------------------------------------------------------------------------------------------------
# training on a toy set where each finding has its own codes at its own place (tests/toys.py: KINDS)

TOY_PARAMS = AlignParams(text_encoder="scratch", scratch_hidden=32, scratch_layers=1, scratch_heads=2,
                         text_head_layers=0, embed_dim=32, patch_dim=32, patch_layers=0, patch_heads=2, steps=80,
                         batch_size=8, lr=3e-3, warmup_steps=5, eval_every=40, bank=BankParams(per_key=4, min_support=2),
                         mask_background=False)


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    train, val = toy_pairs(6, 0), toy_pairs(2, 1)
    codebook = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    model, result = fit(TOY_PARAMS, train, val, codebook, seed=0, device="cpu", progress=False,
                        workdir=tmp_path_factory.mktemp("w"))
    model.bank = old_rule_bank(model, train.texts, train.grids, per_key=4, min_support=2)
    return model, result, train, val


def test_training_aligns_matching_pairs(toy_model):
    model, result, _, val = toy_model
    assert result.step == TOY_PARAMS.steps
    matched = model.score(val.texts, val.grids)
    shuffled = model.score(val.texts, np.roll(val.grids, 1, axis=0))  # every text against another kind's image
    assert matched.dtype == np.float64 and matched.shape == (len(val.texts),)
    assert matched.mean() > shuffled.mean()
    r = retrieval_metrics(model.similarity_matrix(val.texts, val.grids), val.groups)
    assert r["text_to_image/R@1"] > r["text_to_image/chance@1"]


def test_similarity_map_points_at_the_finding(toy_model):
    model, _, _, val = toy_model
    words, maps = model.similarity_map(val.texts[0], val.grids[0])  # right pleural effusion
    assert words == ["FINDINGS", "There", "is", "a", "right", "pleural", "effusion"]
    assert maps.shape == (len(words), H, W)
    top = top_positions(maps[words.index("effusion")], 3)
    assert len(set(top) & set(KINDS[val.texts[0]][1])) >= 2


def test_streamed_token_maps_equal_the_whole_list_and_are_made_a_batch_at_a_time(toy_model):
    model, _, train, _ = toy_model
    whole = model.token_maps(train.texts, train.grids, batch_size=4)
    it = model.iter_token_maps(train.texts, train.grids, batch_size=4)
    first = next(it)
    live = {id(first[0])}  # the TextBatch of the batch being read
    streamed = [first]
    for item in it:
        streamed.append(item)
        live.add(id(item[0]))
    assert len(streamed) == len(whole) == len(train.texts)
    for (tb_a, ja, sa), (tb_b, jb, sb) in zip(whole, streamed):
        assert ja == jb and np.array_equal(sa, sb)
        assert tb_a.offsets[ja] == tb_b.offsets[jb]
    assert len(live) == -(-len(train.texts) // 4)  # one text batch per 4 texts, made as the stream reaches it
    assert not model.training


def test_bank_and_key_patches_are_deterministic_and_follow_the_findings(toy_model):
    model, _, train, _ = toy_model
    again = old_rule_bank(model, train.texts, train.grids, per_key=4, min_support=2)
    assert again.to_dict() == model.bank.to_dict()
    assert "pleural effusion|right pleural space" in model.bank.entries and "pleural effusion" in model.bank.entries
    prompt = "FINDINGS: Moderate right pleural effusion."
    kps = model.key_patches(prompt, 3)
    assert kps == model.key_patches(prompt, 3) and len(kps) == 3
    assert all(kp.term == "pleural effusion|right pleural space" for kp in kps)
    cells = KINDS["FINDINGS: There is a right pleural effusion."][1]
    assert sum((kp.row, kp.col) in cells for kp in kps) >= 2
    assert any(kp.code == 10 for kp in kps)
    assert model.key_patches("FINDINGS: The lungs are clear.", 3) == []  # no positive term: no clue


@pytest.mark.parametrize("rule", ["shift", "text"])
def test_every_bank_rule_finds_the_findings_places(toy_model, rule):
    model, _, train, _ = toy_model
    bank = old_rule_bank(model, train.texts, train.grids, per_key=4, min_support=2, rule=rule)
    assert bank.meta["rule"] == rule
    for text, (code, cells) in KINDS.items():
        if code is None:
            continue
        kps = bank.select(terms_of_text(text), 3)
        assert sum((kp.row, kp.col) in cells for kp in kps) >= 2, (rule, text, kps)
    with pytest.raises(ValueError, match="bank rule"):
        old_rule_bank(model, train.texts, train.grids, rule="nearest")


def _bank_set(specs, seed):
    """Toy bank data: (text, code, cells, view, copies) -> Pairs and their views, background codes 0..5."""
    rng = np.random.default_rng(seed)
    texts, grids, views = [], [], []
    for text, code, cells, view, copies in specs:
        for _ in range(copies):
            g = rng.integers(0, 6, size=(H, W))
            for r, c in cells:
                g[r, c] = code
            if view == "AP":
                g[3, 3] = 15  # what every AP film shows (a shoulder, say), whatever the report says
            texts.append(text)
            grids.append(g)
            views.append(view)
    return Pairs(texts, np.asarray(grids, np.uint16), np.arange(len(texts))), np.asarray(views)


EFFUSION, CLEAR = "FINDINGS: There is a right pleural effusion.", "FINDINGS: The lungs are clear."


def test_bank_compares_within_views(toy_model):
    # every effusion film is AP, most others PA: across views the AP mark at (3, 3) looks like part of the finding;
    # within views it cancels
    model = toy_model[0]
    cells = KINDS[EFFUSION][1]
    pairs, views = _bank_set([(EFFUSION, 10, cells, "AP", 6), (CLEAR, None, [], "AP", 3),
                              (CLEAR, None, [], "PA", 15)], 3)
    key = "pleural effusion|right pleural space"

    def rank_of_mark(bank):
        return [(kp.row, kp.col) for kp in bank.entries[key]].index((3, 3))

    # the shift rule sees any change of the patches (the toy model never learnt the mark, so its words do not)
    pooled = old_rule_bank(model, pairs.texts, pairs.grids, per_key=16, min_support=2, rule="shift", strata=None)
    within = old_rule_bank(model, pairs.texts, pairs.grids, per_key=16, min_support=2, rule="shift", strata=views)
    assert within.meta["strata"] == ["AP", "PA"] and pooled.meta["strata"] is None
    assert rank_of_mark(pooled) <= len(cells) + 1  # right after the finding's own cells
    assert rank_of_mark(within) >= 12  # among the last of the 16 cells
    assert set((kp.row, kp.col) for kp in within.entries[key][:3]) == set(cells)
    with pytest.raises(ValueError, match="strata"):
        old_rule_bank(model, pairs.texts, pairs.grids, strata=views[:-1])


def test_bank_shift_in_code_space_does_not_need_the_patch_encoder(toy_model):
    # the patch encoder made blind (every cell embeds alike): the trained-patch shift sees nothing, the frozen code
    # vectors still show where the effusion images differ
    model = toy_model[0]
    cells = KINDS[EFFUSION][1]
    pairs, views = _bank_set([(EFFUSION, 10, cells, "PA", 6), (CLEAR, None, [], "PA", 8)], 5)
    blind = AlignModel(model.config, model.text_encoder, model.tokenizer)
    blind.core.load_state_dict(model.core.state_dict())
    with torch.no_grad():
        blind.core.patch_encoder.inp.weight.zero_()
        blind.core.patch_encoder.row.zero_()
        blind.core.patch_encoder.col.zero_()
    key = "pleural effusion|right pleural space"
    codes = old_rule_bank(blind, pairs.texts, pairs.grids, per_key=3, min_support=2, rule="shift", space="codes")
    patches = old_rule_bank(blind, pairs.texts, pairs.grids, per_key=3, min_support=2, rule="shift", space="patches")
    assert codes.meta["space"] == "codes" and patches.meta["space"] == "patches"
    assert set((kp.row, kp.col) for kp in codes.entries[key]) == set(cells)
    assert set((kp.row, kp.col) for kp in patches.entries[key]) != set(cells)
    with pytest.raises(ValueError, match="space"):
        old_rule_bank(model, pairs.texts, pairs.grids, space="pixels")


def test_bank_adjustment_takes_a_co_occurring_finding_out_of_the_map(toy_model):
    # every effusion report also names cardiomegaly, and so do other reports: without adjustment the effusion's map
    # also lights the heart (its images differ there from the clear films); fitted together, the heart is
    # cardiomegaly's and the effusion keeps only its own cells
    model = toy_model[0]
    eff, heart = KINDS[EFFUSION][1], KINDS["FINDINGS: The heart is enlarged. Moderate cardiomegaly."][1]
    both = "FINDINGS: There is a right pleural effusion. The heart is enlarged. Moderate cardiomegaly."
    rng = np.random.default_rng(7)
    texts, grids = [], []
    for text, marks, copies in ((both, [(10, eff), (14, heart)], 6),
                                ("FINDINGS: The heart is enlarged. Moderate cardiomegaly.", [(14, heart)], 6),
                                (CLEAR, [], 8)):
        for _ in range(copies):
            g = rng.integers(0, 6, size=(H, W))
            for code, cells in marks:
                for r, c in cells:
                    g[r, c] = code
            texts.append(text)
            grids.append(g)
    grids = np.asarray(grids, np.uint16)

    def ranks(bank):
        order = [(kp.row, kp.col) for kp in bank.entries["pleural effusion"]]
        return sorted(order.index(c) for c in heart), set(order[:3])

    plain = old_rule_bank(model, texts, grids, per_key=H * W, min_support=2, rule="shift", space="codes", smooth=0.0)
    fitted = old_rule_bank(model, texts, grids, per_key=H * W, min_support=2, rule="shift", space="codes", smooth=0.0,
                        adjust=True)
    assert fitted.meta["adjust"] and not plain.meta["adjust"]
    heart_plain, top_plain = ranks(plain)
    heart_fitted, top_fitted = ranks(fitted)
    assert top_plain == top_fitted == set(eff)
    assert heart_plain == [3, 4, 5, 6]           # right after the effusion's own cells
    assert min(heart_fitted) >= 7                 # now among the background cells
    # cardiomegaly's own map keeps the heart
    assert set((kp.row, kp.col) for kp in fitted.entries["cardiomegaly"][:4]) == set(heart)


def test_bank_mirror_pools_left_and_right(toy_model):
    # one right pneumothorax (below min_support) and four left ones: mirrored, the left ones say where it goes
    model = toy_model[0]
    left = KINDS["FINDINGS: There is a left pneumothorax."][1]
    right = [(r, W - 1 - c) for r, c in left]
    pairs, views = _bank_set([("FINDINGS: There is a left pneumothorax.", 12, left, "PA", 4),
                              ("FINDINGS: There is a right pneumothorax.", 12, right, "PA", 1),
                              (CLEAR, None, [], "PA", 8)], 4)
    plain = old_rule_bank(model, pairs.texts, pairs.grids, per_key=4, min_support=2, mirror=False)
    pooled = old_rule_bank(model, pairs.texts, pairs.grids, per_key=4, min_support=2, mirror=True)
    # unpooled, the right side has too few images of its own, and the pair borrows the (left) pathology's place
    assert "pneumothorax@right" not in plain.entries
    assert set((kp.row, kp.col) for kp in plain.entries["pneumothorax|right pleural space"][:3]) != set(right)
    assert pooled.meta["mirror"] and not plain.meta["mirror"]
    for key in ("pneumothorax@right", "pneumothorax|right pleural space"):
        assert set((kp.row, kp.col) for kp in pooled.entries[key][:3]) == set(right), key
    assert all(kp.code == 12 for kp in pooled.entries["pneumothorax@right"][:3])  # the right image's own codes
    # the left side keeps its place, and a right prompt now gets right-sided clues
    assert set((kp.row, kp.col) for kp in pooled.entries["pneumothorax@left"][:3]) == set(left)
    kps = pooled.select(terms_of_text("FINDINGS: There is a right pneumothorax."), 3)
    assert set((kp.row, kp.col) for kp in kps) == set(right)


def test_save_load_round_trip(toy_model, tmp_path):
    model, _, _, val = toy_model
    model.save(tmp_path / "align")
    back = AlignModel.load(tmp_path / "align")
    assert back.config == model.config
    assert np.array_equal(back.score(val.texts, val.grids), model.score(val.texts, val.grids))
    w1, m1 = model.similarity_map(val.texts[2], val.grids[2])
    w2, m2 = back.similarity_map(val.texts[2], val.grids[2])
    assert w1 == w2 and np.array_equal(m1, m2)
    assert back.bank.to_dict() == model.bank.to_dict()
    assert KeyPatchBank.load(tmp_path / "align").to_dict() == model.bank.to_dict()  # what the generator reads
    with pytest.raises(ValueError, match="token grids"):
        back.score(val.texts[:1], val.grids[:1, :2])


def test_patch_attention_window_keeps_embeddings_local():
    from cxrsynth.models.align import AlignConfig, PatchEncoder, window_mask

    m = window_mask((4, 4), 1)
    assert (~m[0]).nonzero().flatten().tolist() == [0, 1, 4, 5]  # cell (0, 0) sees its 2 x 2 corner only
    assert window_mask((4, 4), 0) is None
    torch.manual_seed(0)
    enc = PatchEncoder(AlignConfig(grid=(6, 6), codebook_size=8, code_dim=4, text_hidden=8, patch_dim=16,
                                   patch_heads=2, patch_layers=2, patch_window=1, embed_dim=8),
                       torch.randn(8, 4)).eval()
    g = torch.randint(0, 8, (1, 6, 6))
    g2 = g.clone()
    g2[0, 5, 5] = (g[0, 5, 5] + 1) % 8  # two layers of radius 1 reach 2 cells: (0..2, 0..2) cannot see (5, 5)
    a, b = enc(g).reshape(6, 6, -1), enc(g2).reshape(6, 6, -1)
    assert torch.allclose(a[:3, :3], b[:3, :3], atol=1e-6) and not torch.allclose(a[5, 5], b[5, 5])


def test_training_is_reproducible(toy_model, tmp_path):
    model, _, train, val = toy_model
    p = dataclasses.replace(TOY_PARAMS, steps=10, eval_every=10)
    codebook = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    a, _ = fit(p, train, val, codebook, seed=3, device="cpu", progress=False, workdir=tmp_path / "a")
    b, _ = fit(p, train, val, codebook, seed=3, device="cpu", progress=False, workdir=tmp_path / "b")
    assert np.array_equal(a.score(val.texts, val.grids), b.score(val.texts, val.grids))


# ---------------------------------------------------------------------------------------------------------------
# helpers of the stage

def test_retrieval_metrics_and_chance():
    r = retrieval_metrics(np.eye(4), [0, 1, 2, 3], ks=(1, 2))
    assert r["text_to_image/R@1"] == 1.0 and r["image_to_text/R@1"] == 1.0
    assert r["text_to_image/chance@1"] == 0.25 and r["text_to_image/chance@2"] == 0.5
    # two images of one study share a report: retrieving either counts
    sim = np.array([[0.1, 0.9, 0.0], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0]])
    r = retrieval_metrics(sim, [7, 7, 8], ks=(1,))
    assert r["text_to_image/R@1"] == 1.0
    assert r["text_to_image/chance@1"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3, abs=1e-4)


def test_region_cells_follow_ingest_letterboxing():
    # a 100 x 200 (rows x columns) image padded into a square: rows 50..150 of 200 hold the image
    left_half = {"box": [0, 0, 100, 100], "mask_rle": None}
    cells = region_cells(left_half, 100, 200, 128, "pad", (4, 4))
    assert cells.tolist() == [[False] * 4, [True, True, False, False], [True, True, False, False], [False] * 4]
    # the same region as a run-length mask gives the same cells
    rle = [v for r in range(100) for v in (r * 200, 100)]
    assert np.array_equal(region_cells({"box": [0, 0, 100, 100], "mask_rle": rle}, 100, 200, 128, "pad", (4, 4)),
                          cells)


def test_pointing_metrics_against_area_share():
    cells = np.zeros((4, 4), bool)
    cells[0, :2] = True  # area share 2/16
    case = PointingCase("pneumothorax", 0, cells, None, [(0, 0), (0, 1), (3, 3), (2, 2)], [(0, 0)])
    m = pointing_metrics([case], k=4)
    assert m["pointing/image/pneumothorax"] == 0.5 and m["pointing/bank/pneumothorax"] == 1.0
    assert m["pointing/area_share/pneumothorax"] == 0.125 and m["pointing/ratio/pneumothorax"] == 4.0
    assert json.dumps(m)  # plain JSON
    # the bank ratio's bootstrap interval: one case -> no spread; a hit and a miss -> the interval spans both
    assert m["pointing/ratio_bank_lo/pneumothorax"] == m["pointing/ratio_bank_hi/pneumothorax"] == 8.0
    miss = PointingCase("pneumothorax", 1, cells, None, [], [(3, 3)])
    m = pointing_metrics([case, miss], k=4)
    assert m["pointing/ratio_bank/pneumothorax"] == 4.0
    assert m["pointing/ratio_bank_lo/pneumothorax"] == 0.0 and m["pointing/ratio_bank_hi/pneumothorax"] == 8.0


def test_background_codes_are_masked_out_of_the_maps(toy_model):
    from cxrsynth.models.align_training import background_codes

    g = np.zeros((10, 8, 8), np.uint16) + 3
    g[:, 2:6, 2:6] = 5  # the chest: code 5 fills the grid's central half
    g[:1, 0, 0] = 7  # one image in ten has code 7 in a corner
    assert background_codes(g, share=0.05) == (3, 7) and background_codes(g, share=0.2) == (3,)
    # a corner code that also makes up the chest (dark lung and letterbox sharing a code) is not empty film
    g[:2, 3, 3] = 3  # 2 of the 160 central cells: within inner_rate 0.02, beyond 0.005
    assert background_codes(g, share=0.2, inner_rate=0.02) == (3,) and background_codes(g, share=0.2) == ()
    model, _, _, val = toy_model
    masked = dataclasses.replace(model.config, background_codes=(10,))  # the effusion code is now "empty film"
    clone = AlignModel(masked, model.text_encoder, model.tokenizer)
    clone.core.load_state_dict(model.core.state_dict())
    words, maps = clone.similarity_map(val.texts[0], val.grids[0])
    m = maps[words.index("effusion")]
    cells = KINDS[val.texts[0]][1]
    assert all(m[r, c] == m.min() for r, c in cells)


def test_background_border_masks_the_cells_next_to_empty_film_and_the_grid_edge(toy_model):
    model, _, _, val = toy_model
    h, w = model.config.grid
    g = np.asarray(val.grids[:1]).astype(np.int64).copy()
    bg = int(g.max()) + 1 if int(g.max()) + 1 < model.config.codebook_size else 0
    g[g == bg] = (bg + 1) % model.config.codebook_size
    g[0, h // 2, 0] = bg  # one empty-film cell on the left edge
    cfg = dataclasses.replace(model.config, background_codes=(bg,), background_border=1)
    clone = AlignModel(cfg, model.text_encoder, model.tokenizer)
    pm = clone.patch_mask(torch.as_tensor(g)).numpy().reshape(h, w)
    expect = np.zeros((h, w), bool)
    expect[1:-1, 1:-1] = True                    # the grid's edge ring is masked
    expect[h // 2 - 1:h // 2 + 2, :2] = False    # and the empty cell's neighbours
    assert (pm == expect).all()
    plain = AlignModel(dataclasses.replace(cfg, background_border=0), model.text_encoder, model.tokenizer)
    assert int((~plain.patch_mask(torch.as_tensor(g))).sum()) == 1


def test_report_text_and_params():
    assert report_text(" Big  heart.\n", "Cardiomegaly.", "Last para.") == "FINDINGS: Big heart.\n\nIMPRESSION: Cardiomegaly."
    assert report_text(None, "", "Last para.") == "Last para."
    with pytest.raises(ConfigError, match="align.text_model_path"):
        params_from_dict({"align": {"text_encoder": "pretrained"}})
    with pytest.raises(ConfigError, match="align.text_encoder"):
        params_from_dict({"align": {"text_encoder": "gpt"}})


def test_retrieval_subset_is_the_first_pairs_and_all_when_the_cap_is_off_or_above_n():
    grids = np.arange(5 * 2 * 2, dtype=np.uint16).reshape(5, 2, 2)
    pairs = Pairs([f"t{i}" for i in range(5)], grids, np.array([0, 0, 1, 2, 2]))
    head = pairs.head(3)
    assert head.texts == ["t0", "t1", "t2"] and np.array_equal(head.grids, grids[:3])
    assert head.groups.tolist() == [0, 0, 1]
    assert pairs.head(0) is pairs and pairs.head(5) is pairs and pairs.head(99) is pairs
    with pytest.raises(ConfigError, match="align.retrieval_max"):
        params_from_dict({"align": {"retrieval_max": -1}})


def _toy_truth(text: str) -> dict | None:
    """A ground-truth record for a toy report: its finding's cells as a box on a 32 x 32 stored image (None for the
    clear report: an image without a record)."""
    kind = {"pleural effusion": "effusion", "pneumothorax": "pneumothorax", "cardiomegaly": "cardiomegaly"}
    name = next((k for k in kind if k in text.lower()), None)
    if name is None:
        return None
    rows, cols = zip(*KINDS[text][1])
    box = [min(cols) * 8, min(rows) * 8, (max(cols) + 1) * 8, (max(rows) + 1) * 8]
    return {"dicom_id": text, "rows": 32, "columns": 32, "landmarks": {"unused": list(range(50))},
            "findings": [{"kind": kind[name], "region": {"box": box, "mask_rle": None}, "side": "right"},
                         {"kind": "et_tube", "region": None}]}


def test_pointing_cases_keep_only_the_asked_maps_and_score_the_same(toy_model):
    from cxrsynth.eval.alignment import pointing_cases, pointing_truth

    model, _, _, val = toy_model
    truths = [_toy_truth(t) for t in val.texts]
    full = pointing_cases(model, val, truths, k=2, image_size=32, resize="pad")
    slim = pointing_cases(model, val, [r and pointing_truth(r) for r in truths], k=2, image_size=32, resize="pad",
                          keep_maps=1)
    assert len(full) == len(slim) == sum(r is not None for r in truths) == 6
    for a, b in zip(full, slim):
        assert (a.finding, a.index, a.image_top, a.bank_top) == (b.finding, b.index, b.image_top, b.bank_top)
        assert np.array_equal(a.cells, b.cells) and a.cells.any()
    kept = [c for c in slim if c.word_map is not None]
    # one map per finding group, the first case of each, equal to the unslimmed one
    assert sorted(c.finding for c in kept) == sorted({c.finding for c in full})
    for c in kept:
        first = next(f for f in full if f.finding == c.finding)
        assert c.index == first.index and np.array_equal(c.word_map, first.word_map)
    assert pointing_metrics(full, 2) == pointing_metrics(slim, 2)
    assert all(c.word_map is None for c in pointing_cases(model, val, truths, k=2, image_size=32, resize="pad",
                                                         keep_maps=0))
    assert set(pointing_truth(truths[0])) == {"rows", "columns", "findings"}  # the et tube has no region: left out
    assert [f["kind"] for f in pointing_truth(truths[0])["findings"]] == [truths[0]["findings"][0]["kind"]]


def test_truth_by_image_reads_only_the_asked_images(tmp_path):
    from cxrsynth.data.phantom.truth import truth_by_image

    path = tmp_path / "ground_truth.jsonl"
    path.write_text("".join(json.dumps({"dicom_id": f"d{i}", "ctr": i / 10}) + "\n" for i in range(5)) + "\n")
    assert list(truth_by_image(path)) == ["d0", "d1", "d2", "d3", "d4"]
    assert truth_by_image(path, ids=["d3", "d1", "absent"]) == {"d1": {"dicom_id": "d1", "ctr": 0.1},
                                                                 "d3": {"dicom_id": "d3", "ctr": 0.3}}
    assert truth_by_image(path, lambda r: r["ctr"], ids={"d4"}) == {"d4": 0.4}
    assert truth_by_image(path, ids=[]) == {}
