"""Synthesis: constrained sampling, per-image seeds (alone == in a batch), outputs with lineage, the CLI."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrsynth.__main__ import main as cli
from cxrsynth.keypatches import KeyPatch, KeyPatchBank, terms_of_text
from cxrsynth.models.generator import ModelSpec, build_tokenizer, new_generator
from cxrsynth.models.vqgan import VQGAN, VQGANConfig
from cxrsynth.pipeline import PromptRecord, load_models, prompts_from_reports, synthesize
from cxrsynth.data.synthetic import MANIFEST_COLUMNS
from cxrsynth.data.synthetic_writer import write_outputs
from cxrsynth.models.token_sampler import Sampling, filter_logits, image_seed, pick, sample_codes
from cxrsynth.text.chexpert import OBSERVATIONS

GRID, K = (4, 4), 16


TEXTS = ["FINDINGS: Moderate right pleural effusion.\n\nIMPRESSION: Right pleural effusion.",
         "FINDINGS: Severe cardiac enlargement.\n\nIMPRESSION: Cardiomegaly.",
         "FINDINGS: No acute process. Lungs are clear."] * 3


def tiny_generator(seed: int = 0):
    bank = KeyPatchBank(GRID, K, {"pleural effusion": [KeyPatch(3, 3, 3, 0.9, "pleural effusion")],
                                  "cardiomegaly": [KeyPatch(7, 2, 1, 0.7, "cardiomegaly")]})
    gen = new_generator(ModelSpec(d_model=16, n_layers=2, n_heads=2), build_tokenizer(TEXTS, 40, GRID, K),
                        grid=GRID, codebook_size=K, key_patches=2, max_text_tokens=10, bank=bank, seed=seed)
    gen.model.eval()
    return gen


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A models/ folder with a tiny (untrained) generator and VQ-GAN, as the stages write them."""
    root = tmp_path_factory.mktemp("models")
    gen = tiny_generator()
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(image_size=16, channels=32, channel_mult=(1, 1, 2), z_channels=8, embed_dim=8,
                           codebook_size=K, quantizer="vq2"))
    vq.save(root / "vqgan")
    gen.save(root / "generator")
    return root


def prompts_of(gen, texts, view="PA"):
    return [gen.encode_prompt(t, gen.key_patches(terms_of_text(t)), view) for t in texts]


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.0), Sampling(temperature=3.0, top_k=3),
                                      Sampling(top_p=0.3, batch_size=2), Sampling(guidance_scale=3.0)])
def test_sampled_grids_always_have_exactly_hw_in_range_codes(sampling):
    gen = tiny_generator()
    with torch.no_grad():  # make non-image tokens the most likely ones: the constraint must still hold
        gen.model.get_output_embeddings().bias = None
        gen.model.get_output_embeddings().weight[:gen.layout.img_offset] *= 50
    codes = sample_codes(gen, prompts_of(gen, TEXTS[:5]), list(range(5)), sampling, views=["PA"] * 5)
    assert codes.shape == (5, *GRID) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < K


def test_a_seed_reproduces_an_image_alone_or_in_a_batch_and_seeds_differ():
    gen = tiny_generator()
    prompts = prompts_of(gen, TEXTS[:4])
    for sampling in (Sampling(batch_size=4), Sampling(batch_size=3, guidance_scale=2.0, top_k=8)):
        batch = sample_codes(gen, prompts, [11, 12, 13, 14], sampling, views=["PA"] * 4)
        for i in range(4):
            alone = sample_codes(gen, [prompts[i]], [11 + i], sampling, views=["PA"])
            assert np.array_equal(alone[0], batch[i])
    again = sample_codes(gen, prompts, [11, 12, 13, 14], Sampling(batch_size=4))
    other = sample_codes(gen, prompts, [21, 22, 23, 24], Sampling(batch_size=4))
    assert np.array_equal(again, sample_codes(gen, prompts, [11, 12, 13, 14], Sampling(batch_size=2)))
    assert all(not np.array_equal(again[i], other[i]) for i in range(4))


def test_the_kv_cache_matches_a_full_forward():
    gen = tiny_generator()
    p = prompts_of(gen, TEXTS[:1])
    codes = sample_codes(gen, p, [5], Sampling(temperature=0.0))[0].reshape(-1)
    lay = gen.layout
    ids = torch.tensor([p[0][0] + (codes + lay.img_offset).tolist()])
    mask = torch.tensor([p[0][1] + [1] * len(codes)])
    with torch.no_grad():
        logits = gen.logits(ids, mask)[0, lay.prompt_len - 1:-1, lay.img_offset:lay.img_offset + K]
    assert np.array_equal(logits.argmax(-1).numpy(), codes)   # greedy with cache == greedy from whole sequences


def test_key_patch_cells_read_back_what_the_prompt_wrote():
    gen = tiny_generator()
    lay = gen.layout
    kps = [KeyPatch(5, 3, 1, 0.9, "a"), KeyPatch(15, 0, 2, 0.5, "b")]   # code, row, col
    ids, _ = lay.prompt([lay.kp_id, lay.kp_end_id, 7], kps, "PA")   # text that spells the block's own ids
    assert lay.key_patch_cells(ids) == [(3 * GRID[1] + 1, 5), (2, 15)]
    assert lay.key_patch_cells(lay.prompt([7, 8], [], "PA")[0]) == []                 # an empty block
    assert lay.key_patch_cells(gen.unconditional_prompt("PA")[0]) == []               # no block at all


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_forced_key_patches_sit_at_their_cells_and_leave_the_draws_before_them_alone(guidance):
    gen = tiny_generator()
    prompts = prompts_of(gen, TEXTS[:4])          # effusion (one patch at cell 3), cardiomegaly (two), none
    cells = [gen.layout.key_patch_cells(p[0]) for p in prompts]
    assert cells[0] and cells[1] and not cells[2]
    free = Sampling(batch_size=4, guidance_scale=guidance)
    force = Sampling(batch_size=4, guidance_scale=guidance, key_patch_placement="force")
    a = sample_codes(gen, prompts, [1, 2, 3, 4], free, views=["PA"] * 4).reshape(4, -1)
    b = sample_codes(gen, prompts, [1, 2, 3, 4], force, views=["PA"] * 4).reshape(4, -1)
    for i, kp in enumerate(cells):
        for cell, code in kp:
            assert b[i, cell] == code
        first = min((c for c, _ in kp), default=a.shape[1])
        assert np.array_equal(a[i, :first], b[i, :first])      # same uniforms, same prefix up to the first patch
    assert np.array_equal(a[2], b[2])                          # no key patches: nothing forced
    alone = sample_codes(gen, [prompts[1]], [2], force, views=["PA"])
    assert np.array_equal(alone[0].reshape(-1), b[1])          # forced images are still reproducible alone


def test_filter_and_pick_known_values():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    p = filter_logits(logits, 1.0, 2, 1.0)
    assert p[0, :2].tolist() == [0.0, 0.0] and abs(float(p.sum()) - 1) < 1e-12
    p = filter_logits(logits, 1.0, 0, 0.5)            # top-p: only the most likely (0.64 >= 0.5)
    assert p[0].tolist() == [0.0, 0.0, 0.0, 1.0]
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]]).double()
    assert pick(probs, torch.tensor([0.0])).item() == 1   # u = 0 never lands on a zero-probability code
    assert pick(probs, torch.tensor([0.49])).item() == 1
    assert pick(probs, torch.tensor([0.51])).item() == 3
    assert pick(probs, torch.tensor([0.999999])).item() == 3


def test_image_seed_is_stable_and_distinct():
    assert image_seed(0, "s1", 0, 0) == image_seed(0, "s1", 0, 0)
    seeds = {image_seed(0, "s1", 0, 0), image_seed(1, "s1", 0, 0), image_seed(0, "s2", 0, 0),
             image_seed(0, "s1", 1, 0), image_seed(0, "s1", 0, 1)}
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)


def test_synthesize_writes_the_output_contract(models, tmp_path):
    gen, vq, hashes = load_models(models)
    prompts = [PromptRecord("s000", TEXTS[0], "PA", "sampled", terms_of_text(TEXTS[0]), {"Pleural Effusion": 1.0}),
               PromptRecord("p123", TEXTS[2], "AP", "paired", terms_of_text(TEXTS[2]), {},
                            source_study_id=123.0, source_dicom_id="abc-dicom")]
    syn = synthesize(gen, vq, prompts, Sampling(), base_seed=0, samples_per_prompt=2, hashes=hashes,
                     progress=False)
    df = write_outputs(tmp_path / "syn", syn, write_dicom=True, sheet_images=4)
    back = pd.read_parquet(tmp_path / "syn" / "manifest.parquet")
    assert list(back.columns[:len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS and len(back) == 4
    assert back.synthetic_id.tolist() == ["syn-s000-0", "syn-s000-1", "syn-p123-0", "syn-p123-1"]
    assert back["Pleural Effusion"].iloc[0] == 1.0 and np.isnan(back["Edema"].iloc[0])
    assert json.loads(back.key_patches.iloc[0])[0] == {"code": 3, "row": 3, "col": 3, "score": 0.9,
                                                      "term": "pleural effusion"}
    assert json.loads(back.key_patches.iloc[2]) == []          # no known terms: no key patches, still an image
    assert back.source_dicom_id.iloc[2] == "abc-dicom" and back.generator_sha256.iloc[0] == hashes["generator_sha256"]
    images = np.load(tmp_path / "syn" / "images.npy")
    assert images.shape == (4, 16, 16) and images.dtype == np.uint8
    png = Image.open(tmp_path / "syn" / back.file.iloc[2])
    assert np.array_equal(np.asarray(png), images[2])
    assert png.text["synthetic"] == "true" and "abc-dicom" not in json.dumps(png.text)
    assert (tmp_path / "syn" / "contact_sheet.png").is_file()
    import pydicom

    ds = pydicom.dcmread(tmp_path / "syn" / "dicom" / "syn-p123-0.dcm")
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and "SYNTHETIC" in ds.SeriesDescription
    assert "abc-dicom" not in str(ds) and TEXTS[2].split()[1] in ds.ImageComments
    # any image regenerates alone, identically
    one = synthesize(gen, vq, prompts[1:], Sampling(), base_seed=0, samples_per_prompt=2, hashes=hashes,
                     progress=False)
    assert np.array_equal(one.images[1], images[3]) and one.rows[1]["seed"] == int(back.seed.iloc[3])
    assert set(df.columns) >= set(OBSERVATIONS)


def test_prompts_from_reports_one_per_test_study():
    m = pd.DataFrame({"study_id": [5, 5, 7, 9], "dicom_id": ["b", "a", "c", "d"], "split": ["test"] * 3 + ["train"],
                      "view": ["PA", "AP", "AP", "PA"], "findings": ["Right pleural effusion.", "x", None, "y"],
                      "impression": ["Effusion.", "x", "Cardiomegaly.", "y"],
                      **{o: [1.0, 1.0, np.nan, 0.0] for o in OBSERVATIONS}})
    ps = prompts_from_reports(m)
    assert [p.prompt_id for p in ps] == ["r5", "r7"] and [p.source_dicom_id for p in ps] == ["a", "c"]
    assert ps[0].kind == "report" and ps[0].text.startswith("FINDINGS: x")
    assert ps[1].text == "IMPRESSION: Cardiomegaly." and ps[1].terms[0].pathology == "cardiomegaly"


def test_generate_command_on_tiny_models(models, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli(["generate", "Moderate right pleural effusion.", "-n", "3", "--seed", "0", "--out", str(out),
              "--models", str(models), "--device", "cpu"])
    assert rc == 0
    df = pd.read_parquet(out / "manifest.parquet")
    assert len(df) == 3 and all((out / f).is_file() for f in df.file)
    assert json.loads(df.key_patches.iloc[0])[0]["term"] == "pleural effusion"
    rc = cli(["generate", "Zebra stripes.", "--out", str(tmp_path / "o2"), "--models", str(models)])
    assert rc == 0 and len(pd.read_parquet(tmp_path / "o2" / "manifest.parquet")) == 1
    rc = cli(["generate", "x", "--out", str(tmp_path / "o3"), "--models", str(tmp_path / "nothing")])
    assert rc == 2 and "train it first" in capsys.readouterr().err
    rc = cli(["generate", "Moderate right pleural effusion.", "--out", str(tmp_path / "o4"), "--models", str(models),
              "--device", "cpu", "--key-patches", "force"])
    forced = pd.read_parquet(tmp_path / "o4" / "manifest.parquet").iloc[0]
    assert rc == 0 and forced.key_patch_placement == "force"
    with pytest.raises(SystemExit) as err:
        cli(["generate", "x", "--out", str(tmp_path / "o5"), "--models", str(models), "--key-patches", "sideways"])
    assert err.value.code == 2 and "key_patch_placement" in capsys.readouterr().err


def test_png_layouts_hold_the_same_images(tmp_path):
    """tar shards and the no-PNG layout carry exactly the loose layout's PNG bytes (or the pixels), deterministically,
    and `export-png` turns either back into the loose files."""
    import tarfile

    from cxrsynth.__main__ import main as cli
    from cxrsynth.png_archive import pixels_sha256, read_png
    from cxrsynth.data.synthetic_writer import write_images, write_tables

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    rows = [{"synthetic_id": f"syn-s{i}-0", "prompt_id": f"s{i}", "text": "Right pleural effusion.", "view": "PA",
             "seed": i, "sample": 0, "source_study_id": None, "key_patches": "[]", "n_key_patches": 0} for i in range(5)]
    loose = write_images(tmp_path / "loose", rows, images)
    tar = write_images(tmp_path / "tar", rows, images, layout="tar", shard_size=2)
    again = write_images(tmp_path / "tar2", rows, images, layout="tar", shard_size=2)
    none = write_images(tmp_path / "none", rows, images, layout="none")
    assert sorted(p.name for p in (tmp_path / "tar" / "png").iterdir()) == ["000000.tar", "000001.tar", "000002.tar"]
    assert not (tmp_path / "tar" / "images").exists() and not (tmp_path / "none" / "images").exists()
    for a, b, c, d, img in zip(loose, tar, again, none, images):
        data = read_png(tmp_path / "tar", b)
        assert data == (tmp_path / "loose" / a["file"]).read_bytes() == read_png(tmp_path / "loose", a)
        assert b["png_sha256"] == a["png_sha256"] and b["pixels_sha256"] == pixels_sha256(img) == d["pixels_sha256"]
        assert (b["file"], b["member"]) == (c["file"], c["member"]) and d["file"] is None and d["png_sha256"] is None
    for name in ("000000.tar", "000002.tar"):
        assert (tmp_path / "tar" / "png" / name).read_bytes() == (tmp_path / "tar2" / "png" / name).read_bytes()
    with tarfile.open(tmp_path / "tar" / "png" / "000001.tar") as t:
        assert t.getnames() == ["syn-s2-0.png", "syn-s3-0.png"] and {m.mtime for m in t.getmembers()} == {0}
    for layout, done in (("tar", tar), ("none", none)):
        write_tables(tmp_path / layout, done, images, sheet_images=2)
        assert cli(["export-png", str(tmp_path / layout), "--out", str(tmp_path / f"out-{layout}")]) == 0
        for a in loose:
            assert (tmp_path / f"out-{layout}" / f"{a['synthetic_id']}.png").read_bytes() == \
                (tmp_path / "loose" / a["file"]).read_bytes()
    assert cli(["export-png", str(tmp_path / "tar"), "--out", str(tmp_path / "tar" / "inside")]) == 2


RADIOLOGIST_PROMPTS = {  # radiologists' own phrasing (not the template writer's) -> the bank key it must reach
    "Blunting of the right costophrenic angle, likely small effusion.": "pleural effusion",
    "Layering right effusion with adjacent atelectasis.": "pleural effusion",
    "Enlarged cardiac silhouette.": "cardiomegaly",
    "Heart size is moderately enlarged; no pneumothorax.": "cardiomegaly",
    "Patchy opacity in the left lower lobe concerning for pneumonia.": None,  # terms found, none in the tiny bank
}


def test_radiologists_wording_goes_through_generate(models, tmp_path, capsys):
    """Free-text prompts: terms extracted, the bank's key patches found where it knows the finding, an image written
    either way."""
    for i, (text, key) in enumerate(RADIOLOGIST_PROMPTS.items()):
        assert terms_of_text(text), text
        out = tmp_path / f"o{i}"
        rc = cli(["generate", text, "--out", str(out), "--models", str(models), "--device", "cpu"])
        assert rc == 0, capsys.readouterr().err
        row = pd.read_parquet(out / "manifest.parquet").iloc[0]
        kps = json.loads(row.key_patches)
        if key is None:
            assert row.n_key_patches == 0
        else:
            assert row.n_key_patches >= 1 and kps[0]["term"] == key, (text, kps)
        assert (out / row.file).is_file()
