"""The token store and the tokens stage: uint16 memmaps aligned with the manifest, a sidecar that catches mismatches."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from images import blobs

from cxrsynth.config import CodebookParams
from cxrsynth.data.arrays import NpyRows
from cxrsynth.data.tokens import TokenStoreError, load_tokens, read_meta, tokens_file, write_tokens
from cxrsynth.models.vqgan import VQGAN, fit, psnr, to_model_input, to_unit, weights_sha256

SPLIT_SIZES = {"train": 40, "validate": 4, "test": 4}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny ingested dataset (manifest rows in shuffled order), a VQ-GAN trained on it, and a params.yaml."""
    root = tmp_path_factory.mktemp("tokens")
    interim = root / "data" / "interim"
    interim.mkdir(parents=True)
    rows, images = [], {}
    for k, (split, n) in enumerate(SPLIT_SIZES.items()):
        images[split] = blobs(n, size=32, seed=10 + k)
        np.save(interim / f"images_{split}.npy", images[split])
        rows += [{"dicom_id": f"{split}-{i}", "split": split, "image_row": i} for i in range(n)]
    manifest = pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)
    manifest.to_parquet(interim / "manifest.parquet")
    p = CodebookParams(image_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                       z_channels=32, embed_dim=8, codebook_size=64, disc_layers=1, disc_channels=8, steps=250,
                       batch_size=8, lr=3e-3, warmup_steps=10, disc_start=10**6, eval_every=250,
                       checkpoint_every=250)
    model, _ = fit(p, images["train"], images["validate"], device="cpu", progress=False)
    model.save(root / "models" / "vqgan")
    (root / "params.yaml").write_text(yaml.safe_dump({"base": {"device": "cpu"}, "tokens": {"batch_size": 4}}))
    return root, images, manifest


def test_stage_writes_aligned_uint16_tokens_that_decode_close_to_the_images(workspace, monkeypatch):
    root, images, manifest = workspace
    monkeypatch.chdir(root)
    from cxrsynth.stages.tokens import main

    main()
    model = VQGAN.load(root / "models" / "vqgan")
    meta = read_meta(root / "data" / "tokens")
    assert meta.grid_size == (8, 8) and meta.codebook_size == 64 and meta.image_size == 16
    assert meta.vqgan_sha256 == weights_sha256(root / "models" / "vqgan")
    assert {s: v["count"] for s, v in meta.splits.items()} == SPLIT_SIZES
    sidecar = json.loads((root / "data" / "tokens" / "tokens.json").read_text())
    assert sidecar["counts"] == SPLIT_SIZES and sidecar["dtype"] == "uint16"
    for split, n in SPLIT_SIZES.items():
        tokens = load_tokens(root / "data" / "tokens", split, vqgan=root / "models" / "vqgan")
        assert isinstance(tokens, NpyRows) and tokens.dtype == np.uint16 and tokens.shape == (n, 8, 8)
        # row i belongs to the manifest row with image_row i (the manifest itself is in shuffled order)
        for _, row in manifest[manifest.split == split].iterrows():
            i = int(row.image_row)
            assert np.array_equal(tokens[i], model.tokenize(images[split][i:i + 1])[0]), row.dicom_id
        decoded = torch.from_numpy(model.decode_tokens(tokens))
        ref = to_unit(to_model_input(images[split], 16))[:, 0]
        close, baseline = psnr(decoded, ref).mean(), psnr(ref.mean(0, keepdim=True).expand_as(ref), ref).mean()
        assert close > 25 and close > baseline + 6, (split, float(close), float(baseline))
    metrics = json.loads((root / "metrics" / "tokens.json").read_text())
    assert metrics["test"]["count"] == 4 and metrics["test"]["decoded_psnr"] > 25


def test_hash_and_content_mismatches_are_detected(tmp_path, workspace):
    root = workspace[0]
    vq = root / "models" / "vqgan"
    rng = np.random.default_rng(0)
    tokens = {"train": rng.integers(0, 64, (5, 8, 8)), "test": rng.integers(0, 64, (2, 8, 8))}
    write_tokens(tmp_path, tokens, codebook_size=64, image_size=16, vqgan_sha256=weights_sha256(vq))
    assert np.array_equal(load_tokens(tmp_path, "train", vqgan=vq), tokens["train"])
    # tokens of other weights
    torch.manual_seed(1)
    other = VQGAN(VQGAN.load(vq).config)
    other.save(tmp_path / "other")
    with pytest.raises(TokenStoreError, match="made by VQ-GAN weights"):
        load_tokens(tmp_path, "train", vqgan=tmp_path / "other")
    with pytest.raises(TokenStoreError, match="made by VQ-GAN weights"):
        load_tokens(tmp_path, "train", expected_sha256="0" * 64)
    # an array changed after the sidecar was written
    changed = np.load(tokens_file(tmp_path, "test"))
    changed[0, 0, 0] = (int(changed[0, 0, 0]) + 1) % 64
    np.save(tokens_file(tmp_path, "test"), changed)
    with pytest.raises(TokenStoreError, match="content hash"):
        load_tokens(tmp_path, "test")
    assert load_tokens(tmp_path, "test", verify=False).shape == (2, 8, 8)
    np.save(tokens_file(tmp_path, "test"), changed[:1])
    with pytest.raises(TokenStoreError, match=r"expected uint16 \[2, 8, 8\]"):
        load_tokens(tmp_path, "test", verify=False)
    with pytest.raises(TokenStoreError, match="no split 'validate'"):
        load_tokens(tmp_path, "validate")
    (tmp_path / "tokens.json").unlink()
    with pytest.raises(TokenStoreError, match="sidecar missing"):
        load_tokens(tmp_path, "train")


def test_writer_rejects_what_uint16_tokens_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        write_tokens(tmp_path, {"train": np.full((1, 2, 2), 64)}, codebook_size=64, image_size=8, vqgan_sha256="x")
    with pytest.raises(ValueError, match="uint16"):
        write_tokens(tmp_path, {"train": np.zeros((1, 2, 2), int)}, codebook_size=70000, image_size=8,
                     vqgan_sha256="x")
    with pytest.raises(ValueError, match="one grid size"):
        write_tokens(tmp_path, {"a": np.zeros((1, 2, 2), int), "b": np.zeros((1, 3, 3), int)}, codebook_size=8,
                     image_size=8, vqgan_sha256="x")
    assert not (tmp_path / "tokens.json").exists()
