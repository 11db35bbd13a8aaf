"""The VQ-GAN: quantizer invariants (both quantizers), the taming API, save/load, overfitting, exact resume, presets."""
import json

import numpy as np
import pytest
import torch

from images import blobs

from cxrsynth.config import CodebookParams, ConfigError, params_from_dict
from cxrsynth.models.folder import ModelFolderError
from cxrsynth.models.vqgan import (QUANTIZERS, VQGAN, PerceptualLoss, VQGANConfig, VQGANTrainer, adaptive_weight,
                                   code_usage, fit, hinge_d_loss, psnr, reconstruction_metrics, ssim, to_model_input,
                                   to_unit, training_setup, weights_sha256)
from cxrsynth.train import train

TINY = dict(image_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=32,
            embed_dim=8, codebook_size=32)


def tiny(quantizer: str, **kw) -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(VQGANConfig(**{**TINY, "quantizer": quantizer, **kw}))


def tiny_params(**kw) -> CodebookParams:
    base = dict(image_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                z_channels=32, embed_dim=8, codebook_size=32, disc_layers=1, disc_channels=8, steps=8,
                batch_size=4, lr=2e-3, warmup_steps=2, disc_start=4, eval_every=4, checkpoint_every=3)
    return CodebookParams(**{**base, **kw})


def warmed(quantizer: str) -> VQGAN:
    """A tiny model after one training-mode forward (the EMA codebook is k-means initialised then), in eval mode."""
    model = tiny(quantizer)
    model.train()
    model(to_model_input(blobs(8), 16))
    return model.eval()


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_quantized_latents_are_the_codebook_rows_of_their_indices(quantizer):
    model = warmed(quantizer)
    x = to_model_input(blobs(3, seed=1), 16)
    with torch.no_grad():
        enc = model.encode(x)
        z = model.quant_conv(model.encoder(x))
    assert enc.indices.shape == (3, 8, 8) and enc.indices.dtype == torch.int64
    assert int(enc.indices.min()) >= 0 and int(enc.indices.max()) < model.config.codebook_size
    assert enc.quant.shape == (3, 8, 8, 8)
    assert torch.equal(enc.quant, model.codebook[enc.indices].permute(0, 3, 1, 2))
    # each index is the nearest code of its latent vector
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    dist = torch.cdist(flat, model.codebook.detach())
    chosen = dist.gather(1, enc.indices.reshape(-1, 1))[:, 0]
    assert torch.allclose(chosen, dist.min(1).values, atol=1e-5)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_decode_code_equals_decode_of_quant(quantizer):
    model = warmed(quantizer)
    with torch.no_grad():
        enc = model.encode(to_model_input(blobs(2, seed=2), 16))
        a, b = model.decode(enc.quant), model.decode_code(enc.indices)
        c = model.decode_code(enc.indices.to(torch.int32))
    assert a.shape == (2, 1, 16, 16)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_training_mode_straight_through_reaches_the_encoder(quantizer):
    model = warmed(quantizer).train()
    before = model.codebook.detach().clone()  # the EMA codebook moves during the forward: compare with its start
    x = to_model_input(blobs(4), 16)
    rec, enc = model(x)
    assert torch.allclose(enc.quant, before[enc.indices].permute(0, 3, 1, 2), atol=1e-5)
    assert enc.quant.requires_grad
    ((rec - x).abs().mean() + enc.loss).backward()
    assert model.encoder.conv_in.weight.grad is not None and model.encoder.conv_in.weight.grad.abs().sum() > 0
    if quantizer == "vq2":  # the gradient-learned codebook gets the codebook loss; the EMA one is a buffer
        assert model.quantize.embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_save_load_gives_identical_outputs(tmp_path, quantizer):
    model = warmed(quantizer)
    model.save(tmp_path / "vq", extra={"note": "test"})
    meta = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert meta["format"] == "cxrsynth-vqgan" and meta["grid_size"] == [8, 8] and meta["codebook_size"] == 32
    assert meta["config"]["quantizer"] == quantizer and "[-1, 1]" in meta["input"] and meta["training"]["note"]
    loaded = VQGAN.load(tmp_path / "vq")
    assert not loaded.training
    x = to_model_input(blobs(3, seed=3), 16)
    with torch.no_grad():
        (r1, e1), (r2, e2) = model(x), loaded(x)
    assert torch.equal(e1.indices, e2.indices) and torch.equal(r1, r2)
    assert torch.equal(model.codebook, loaded.codebook)
    images = blobs(5, size=40, seed=4)  # numpy helpers resize any side to the model's
    assert np.array_equal(model.tokenize(images), loaded.tokenize(images))
    assert loaded.reconstruct(images).shape == (5, 16, 16)
    # the same weights give the same file hash; other weights another
    model.save(tmp_path / "again")
    assert weights_sha256(tmp_path / "vq") == weights_sha256(tmp_path / "again")
    tiny(quantizer, codebook_size=16).save(tmp_path / "other")
    assert weights_sha256(tmp_path / "other") != weights_sha256(tmp_path / "vq")


def test_load_is_strict(tmp_path):
    tiny("vq2").save(tmp_path / "vq")
    meta = json.loads((tmp_path / "vq" / "config.json").read_text())
    meta["config"]["embed_dim"] = 16
    (tmp_path / "vq" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFolderError, match="do not match"):
        VQGAN.load(tmp_path / "vq")
    with pytest.raises(ModelFolderError, match="config.json"):
        VQGAN.load(tmp_path / "nothing")


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of 32"):
        VQGANConfig(**{**TINY, "channels": 48})
    with pytest.raises(ValueError, match="image_size"):
        VQGANConfig(**{**TINY, "image_size": 18, "channel_mult": (1, 2, 2)})
    with pytest.raises(ValueError, match="quantizer"):
        VQGANConfig(**{**TINY, "quantizer": "gumbel"})
    with pytest.raises(ValueError, match="uint16"):
        VQGANConfig(**{**TINY, "codebook_size": 70000})


def test_metrics_against_hand_values():
    a = torch.zeros(2, 1, 16, 16)
    b = torch.full((2, 1, 16, 16), 0.1)
    assert torch.allclose(psnr(a, b), torch.tensor([20.0, 20.0]))
    x = torch.rand(3, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(3))
    noise = torch.rand(3, 1, 24, 24, generator=torch.Generator().manual_seed(1))
    small, big = ssim(x, x + 0.1 * noise), ssim(x, x + 0.5 * noise)
    assert (big < small).all() and (small < 1).all()
    # constant images: SSIM reduces to the luminance term (2 mu_a mu_b + c1) / (mu_a^2 + mu_b^2 + c1)
    c1 = 0.01 ** 2
    assert float(ssim(a[:1] + 0.5, b[:1] + 0.5)[0]) == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1), 1e-5)
    u = code_usage(np.array([[0, 0, 1, 1]]), 4)
    assert u["codes_used"] == 2 and u["usage"] == 0.5 and u["perplexity"] == pytest.approx(2.0)
    assert code_usage(np.zeros(9, int), 8)["perplexity"] == pytest.approx(1.0)
    assert "position_entropy" not in code_usage(np.zeros(9, int), 8)  # flat indices: no grid positions


def test_position_entropy_counts_codes_per_grid_position():
    grids = np.zeros((4, 2, 2), np.int64)
    grids[:, 0, 0] = 7                       # one code at this position: 0 nats
    grids[:, 0, 1] = [1, 2, 1, 2]            # two codes, equally often: log 2
    grids[:, 1, 0] = [0, 1, 2, 3]            # four codes: log 4
    grids[:, 1, 1] = [5, 5, 5, 6]            # 3/4, 1/4
    h11 = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    u = code_usage(grids, 8)
    assert u["position_entropy"] == pytest.approx((0 + np.log(2) + np.log(4) + h11) / 4)
    # the same codes shuffled over positions: the pooled histogram (perplexity) is unchanged, the positions are not
    # predictable any more
    shuffled = np.random.default_rng(0).permutation(grids.reshape(-1)).reshape(grids.shape)
    assert code_usage(shuffled, 8)["perplexity"] == pytest.approx(u["perplexity"])
    assert code_usage(shuffled, 8)["position_entropy"] > u["position_entropy"]
    # a torch tensor and a uint16 array (the stored token format) give the same number
    assert code_usage(torch.from_numpy(grids), 8)["position_entropy"] == pytest.approx(u["position_entropy"])
    assert code_usage(grids.astype(np.uint16), 8)["position_entropy"] == pytest.approx(u["position_entropy"])
    assert torch.allclose(to_unit(to_model_input(np.array([[[0, 255]]], np.uint8), 2)).flatten()[[0, 1]],
                          torch.tensor([0.0, 1.0]))


def test_gan_pieces():
    assert float(hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))) == 0.0
    assert float(hinge_d_loss(torch.zeros(4), torch.zeros(4))) == 1.0
    w = torch.ones(3, requires_grad=True)
    assert float(adaptive_weight((2 * w).sum(), (0.5 * w).sum(), w)) == pytest.approx(4.0, rel=1e-3)


def test_adversarial_gradients_stay_on_their_own_side():
    """The generator's adversarial term must not train the discriminator; the discriminator's loss must not train
    the generator."""
    trainer = VQGANTrainer(tiny("vq2"), disc_layers=1, disc_channels=8, disc_start=0, disc_weight=1.0).train()
    x = to_model_input(blobs(4), 16)
    rec, _ = trainer.vqgan(x)
    frozen = {**{n: p.detach() for n, p in trainer.disc.named_parameters()}, **dict(trainer.disc.named_buffers())}
    g_loss = -torch.func.functional_call(trainer.disc, frozen, (rec,)).mean()
    g_loss.backward()
    assert all(p.grad is None for p in trainer.disc.parameters())
    assert trainer.vqgan.last_layer.grad.abs().sum() > 0
    trainer.zero_grad(set_to_none=True)
    d_loss = hinge_d_loss(trainer.disc(x), trainer.disc(rec.detach()))
    d_loss.backward()
    assert all(p.grad is None for p in trainer.vqgan.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.disc.parameters())
    # the full forward, before and after the delayed start
    trainer.zero_grad(set_to_none=True)
    trainer.disc_start = 10
    _, logs = trainer(x, step=9)
    assert "d_loss" not in logs
    loss, logs = trainer(x, step=10)
    assert {"g_loss", "d_loss", "d_weight", "l1", "commitment"} <= set(logs)
    loss.backward()
    assert trainer.disc.main[0].weight.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch 2.13 deprecates TorchScript, still the file format
def test_perceptual_loss_from_a_local_torchscript_file(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    torch.jit.save(torch.jit.script(net), str(tmp_path / "feat.pt"))
    loss = PerceptualLoss(tmp_path / "feat.pt")
    x = to_model_input(blobs(2), 16)
    assert float(loss(x, x)) == 0.0
    y = x.clone().requires_grad_(True)
    v = loss(y, -x)
    v.backward()
    assert float(v.detach()) > 0 and y.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss.net.parameters())
    with pytest.raises(FileNotFoundError):
        PerceptualLoss(tmp_path / "missing.pt")
    p = tiny_params(perceptual_weight=0.5, perceptual_model=str(tmp_path / "feat.pt"), steps=2, disc_start=100)
    s = training_setup(p, blobs(4), blobs(2, seed=1), device="cpu", progress=False)
    _, logs = s.loss_fn(s.trainer, s.batches(0))
    assert "perceptual" in logs


def test_a_small_model_overfits_one_batch():
    images = blobs(4, seed=5)
    p = tiny_params(steps=150, lr=3e-3, warmup_steps=10, disc_start=10**6, eval_every=150, checkpoint_every=150,
                    codebook_size=64, quantizer="ema")
    s = training_setup(p, images, images, device="cpu", progress=False)
    before = reconstruction_metrics(s.trainer.vqgan, images)
    x = s.batches(0)["x"]
    with torch.no_grad():
        l1_before = float(s.loss_fn(s.trainer.eval(), {"x": x, "step": 0})[1]["l1"])
    train(s.trainer, s.loss_fn, s.batches, s.cfg, s.evaluate)
    after = reconstruction_metrics(s.trainer.vqgan, images)
    with torch.no_grad():
        l1_after = float(s.loss_fn(s.trainer.eval(), {"x": x, "step": 0})[1]["l1"])
    assert l1_after < 0.25 * l1_before, (l1_before, l1_after)
    assert after["psnr"] > before["psnr"] + 10 and after["psnr"] > 25, (before, after)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, quantizer):
    images, val = blobs(12, seed=6), blobs(4, seed=7)
    p = tiny_params(quantizer=quantizer, dead_code_threshold=2.0)  # GAN from step 4, revival active: RNG matters
    full = training_setup(p, images, val, device="cpu", progress=False)
    train(full.trainer, full.loss_fn, full.batches, full.cfg, full.evaluate)

    out = tmp_path / "ckpt"
    first = training_setup(p, images, val, device="cpu", out_dir=out, live_dir=tmp_path / "live", progress=False)

    def dying(step):
        if step == 7:
            raise KeyboardInterrupt("killed")
        return first.batches(step)

    with pytest.raises(KeyboardInterrupt):
        train(first.trainer, first.loss_fn, dying, first.cfg, first.evaluate)
    assert json.loads((out / "last" / "state.json").read_text())["step"] == 6
    # a fresh process builds everything again (fit's path), then resumes from step 6
    model, result = fit(p, images, val, seed=0, device="cpu", out_dir=out, live_dir=tmp_path / "live",
                        progress=False)
    assert result.resumed_from == 6 and result.step == 8
    a, b = full.trainer.vqgan.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # other params: the checkpoint is not resumed from
    _, again = fit(tiny_params(quantizer=quantizer, dead_code_threshold=2.0, lr=1e-3), images, val, device="cpu",
                   out_dir=out, progress=False)
    assert again.resumed_from == 0


def test_presets_fill_nulls_and_explicit_values_win():
    p = params_from_dict({}).codebook
    assert p.preset == "phantom" and p.image_size == 64 and p.grid_size == 16 and p.codebook_size == 512
    paper = params_from_dict({"codebook": {"preset": "paper"}}).codebook
    assert (paper.image_size, paper.codebook_size, paper.grid_size) == (256, 1024, 16)
    assert params_from_dict({"codebook": {"preset": "paper", "codebook_size": 2048}}).codebook.codebook_size == 2048
    assert params_from_dict({"codebook": {"image_size": None}}).codebook.image_size == 64
    cfg = VQGANConfig(image_size=paper.image_size, channels=paper.channels, channel_mult=paper.channel_mult,
                      num_res_blocks=paper.num_res_blocks, attn_resolutions=paper.attn_resolutions,
                      z_channels=paper.z_channels, embed_dim=paper.embed_dim, codebook_size=paper.codebook_size)
    assert cfg.grid_size == 16


@pytest.mark.parametrize("raw, key", [
    ({"preset": "huge"}, "codebook.preset"),
    ({"quantizer": "gumbel"}, "codebook.quantizer"),
    ({"image_size": 66}, "codebook.image_size"),
    ({"image_size": "big"}, "codebook.image_size"),
    ({"channels": 48}, "codebook.channels"),
    ({"channel_mult": []}, "codebook.channel_mult"),
    ({"channel_mult": [1, 0]}, "codebook.channel_mult"),
    ({"codebook_size": 70000}, "codebook.codebook_size"),
    ({"warmup_steps": 5000, "steps": 100}, "codebook.warmup_steps"),
    ({"perceptual_weight": 1.0}, "codebook.perceptual_model"),
    ({"attn_resolutions": [0]}, "codebook.attn_resolutions"),
    ({"kmeans_init": "yes"}, "codebook.kmeans_init"),
    ({"bogus": 1}, "codebook.bogus"),
    ({"batch_size": 0}, "codebook.batch_size"),
])
def test_bad_codebook_params_name_the_key(raw, key):
    with pytest.raises(ConfigError) as e:
        params_from_dict({"codebook": raw})
    assert str(e.value).startswith(key), str(e.value)
    assert "\n" not in str(e.value)


def test_bad_tokens_params_name_the_key():
    with pytest.raises(ConfigError, match=r"^tokens\.batch_size"):
        params_from_dict({"tokens": {"batch_size": 0}})
