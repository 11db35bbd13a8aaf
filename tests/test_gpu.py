"""CUDA checks (marker `gpu`; every test is skipped without CUDA): the same models on CPU and GPU agree, sampling on
the GPU keeps the sampler's promises, the shared training loop runs under bf16 autocast and torch.compile, and weights
written on the GPU load on the CPU.

Everything is offline and tiny (built here from random weights and toy data), sized for the whole file to take under
two minutes on one H100, compilation included. Comparisons that claim float32 agreement run with TF32 off
(`strict_fp32`): PyTorch enables TF32 convolutions by default, and `cxrsynth.train.train` switches TF32 matmuls on
for the rest of the process. `restore_tf32` puts both flags back after every test.

Where the sampler's design allows an exception, the tests allow exactly that one: two runs whose logits differ only
by rounding can pick different codes where a draw sits on a decision boundary (inverse-CDF step, top-k / top-p edge,
greedy tie). `assert_same_codes` accepts a difference only when the first differing draw is within 1e-4 of such a
boundary on the float32 CPU reference, and at most one per comparison: anything else is a real disagreement.

Run on a GPU machine from the repo root: `python -m pytest -q -o addopts="" tests/test_gpu.py`
(`bench/gpu_check.sh` does this and more).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from contextlib import contextmanager

import numpy as np
import pytest
import safetensors.torch
import torch

from images import blobs
from toys import KINDS, labeled_squares, save_tiny_bert, toy_pairs, old_rule_bank

from cxrsynth.config import AlignParams, BankParams, ClassifierParams, CodebookParams
from cxrsynth.keypatches import KeyPatch, KeyPatchBank, terms_of_text
from cxrsynth.models.align import AlignConfig, AlignModel, filip_similarity
from cxrsynth.models.text_encoders import scratch_text_encoder
from cxrsynth.models.align_training import retrieval_metrics
from cxrsynth.models.align_training import fit as align_fit
from cxrsynth.models.classifier import Classifier, ClassifierConfig, split_report
from cxrsynth.models.classifier import fit as classifier_fit
from cxrsynth.models.generator import (Generator, ModelSpec, build_tokenizer, image_loss, new_generator,
                                       sequence_batch, training_data, training_setup)
from cxrsynth.models.vqgan import VQGAN, VQGANConfig, reconstruction_metrics, to_model_input
from cxrsynth.models.vqgan import training_setup as vqgan_training_setup
from cxrsynth.pipeline import PromptRecord, decode, synthesize
from cxrsynth.models.token_sampler import Sampling, filter_logits, sample_codes
from cxrsynth.train import TrainConfig, autocast_context, load_weights, resolve_dtype, train

CUDA = torch.device("cuda")
AUTO = "auto"  # the pipeline's default dtype: bf16 autocast on CUDA

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GRID, K = (8, 8), 32            # token grid and codebook of the generator / VQ-GAN pair used for sampling
TEXTS = ["FINDINGS: Moderate right pleural effusion.\n\nIMPRESSION: Right pleural effusion.",
         "FINDINGS: Severe cardiac enlargement.\n\nIMPRESSION: Cardiomegaly.",
         "FINDINGS: No acute process. Lungs are clear.",
         "FINDINGS: Small left pneumothorax at the apex.\n\nIMPRESSION: Left pneumothorax."] * 3


# ----------------------------------------------------------------------------------------------------------------
# precision switches

@pytest.fixture(autouse=True)
def restore_tf32():
    """No test may leave the TF32 switches changed for the next one (`train()` restores them itself)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextmanager
def strict_fp32():
    """Full float32 on CUDA (no TF32 matmuls or convolutions), for comparisons with the CPU."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def max_abs(a, b) -> float:
    a = a.detach().float().cpu() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a, np.float64))
    b = b.detach().float().cpu() if isinstance(b, torch.Tensor) else torch.as_tensor(np.asarray(b, np.float64))
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


# ----------------------------------------------------------------------------------------------------------------
# tiny models (the builders of tests/test_generator.py, test_synthesis.py, test_vqgan.py, test_classifier.py and
# test_align.py, copied so that this file does not depend on those modules' private helpers)

def tiny_bank(grid=GRID, k=K) -> KeyPatchBank:
    return KeyPatchBank(grid, k, {
        "pleural effusion": [KeyPatch(3, 7, 1, 0.9, "pleural effusion"), KeyPatch(4, 6, 1, 0.8, "pleural effusion")],
        "cardiomegaly": [KeyPatch(7, 4, 3, 0.7, "cardiomegaly")],
        "pneumothorax": [KeyPatch(9, 0, 6, 0.6, "pneumothorax")]})


def tiny_generator(spec: ModelSpec | None = None, seed: int = 0, grid=GRID, k=K) -> Generator:
    tok = build_tokenizer(TEXTS, 60, grid, k)
    gen = new_generator(spec or ModelSpec(d_model=64, n_layers=2, n_heads=4), tok, grid=grid, codebook_size=k,
                        key_patches=2, max_text_tokens=12, bank=tiny_bank(grid, k), seed=seed)
    gen.model.eval()
    return gen


def moved(gen: Generator, device: torch.device) -> Generator:
    """The same generator (a copy of its weights) on another device."""
    return Generator(copy.deepcopy(gen.model).to(device).eval(), gen.tokenizer, gen.layout, gen.bank, gen.meta)


def encoded(gen: Generator, texts, view: str = "PA"):
    return [gen.encode_prompt(t, gen.key_patches(terms_of_text(t)), view) for t in texts]


def tiny_vqgan(quantizer: str, warm: bool = True) -> VQGAN:
    """The VQ-GAN of tests/test_vqgan.py (an 8 x 8 grid of 32 codes), after one training-mode forward (k-means
    initialisation of the EMA codebook), in eval mode."""
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(image_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                              z_channels=32, embed_dim=8, codebook_size=32, quantizer=quantizer))
    if warm:
        model.train()
        model(to_model_input(blobs(8), 16))
    return model.eval()


def tiny_classifier(arch: str) -> Classifier:
    torch.manual_seed(0)
    model = Classifier(ClassifierConfig(arch=arch, input_size=32, width=4, depth=(1, 1), pool="avgmax"))
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode really uses them
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def random_images(n: int = 6, size: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# comparing sampled code grids

def _last_logits(gen: Generator, prompt, prefix) -> torch.Tensor:
    """Logits (restricted to the K image tokens, float32, CPU) of the draw that follows `prompt` + `prefix` codes,
    from a full forward without cache."""
    lay = gen.layout
    ids = torch.tensor([list(prompt[0]) + [lay.img_offset + int(c) for c in prefix]], device=gen.device)
    mask = torch.tensor([list(prompt[1]) + [1] * len(prefix)], device=gen.device)
    with torch.no_grad():
        out = gen.logits(ids, mask)[0, -1, lay.img_offset:lay.img_offset + lay.codebook_size]
    return out.float().cpu()


def pick_margin(gen: Generator, prompt, view: str, seed: int, sampling: Sampling, prefix) -> float:
    """How far the draw after `prefix` is from flipping, on `gen` (the float32 CPU reference): the smallest of the
    distance of u x total from the nearest CDF step, the top-k edge and the top-p edge; the top-2 logit gap for
    greedy."""
    logits = _last_logits(gen, prompt, prefix)
    if sampling.guidance_scale != 1.0:
        unc = _last_logits(gen, gen.unconditional_prompt(view), prefix)
        logits = unc + sampling.guidance_scale * (logits - unc)
    if sampling.temperature == 0:
        top = torch.topk(logits, 2).values
        return float(top[0] - top[1])
    margins = []
    x = logits.double() / max(sampling.temperature, 1e-8)
    if sampling.top_k and sampling.top_k < len(x):
        top = torch.topk(x, sampling.top_k + 1).values
        margins.append(float(top[-2] - top[-1]))
    if sampling.top_p < 1.0:
        sp = torch.sort(torch.softmax(x, -1), descending=True).values
        margins.append(float(((sp.cumsum(-1) - sp) - sampling.top_p).abs().min()))
    p = filter_logits(logits[None], sampling.temperature, sampling.top_k, sampling.top_p)[0]
    cdf = p.cumsum(-1)
    n = gen.layout.n_image_tokens
    u = torch.rand(n, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)[len(prefix)]
    margins.append(float((cdf - u * cdf[-1]).abs().min()))
    return min(margins)


def assert_same_codes(ref: Generator, prompts, views, seeds, sampling: Sampling, a: np.ndarray, b: np.ndarray,
                      what: str, max_ties: int = 1) -> None:
    """a == b image by image, except at most `max_ties` images whose first differing draw is a rounding near-tie
    (within 1e-4 of a decision boundary on `ref`)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    assert a.shape == b.shape, what
    ties = []
    for i in range(len(a)):
        diff = np.flatnonzero(a[i] != b[i])
        if not len(diff):
            continue
        t = int(diff[0])
        m = pick_margin(ref, prompts[i], views[i], seeds[i], sampling, a[i, :t].tolist())
        assert m < 1e-4, (f"{what}: image {i} differs at {len(diff)} of {a.shape[1]} tokens, first at token {t}, "
                          f"where the draw is {m:.2e} away from any decision boundary: not a rounding near-tie")
        ties.append((i, t, m))
    assert len(ties) <= max_ties, f"{what}: {len(ties)} images differ (each at a near-tie): {ties}"


# ----------------------------------------------------------------------------------------------------------------
# forward passes: CPU and CUDA agree in float32; weights written on CUDA load on the CPU

def test_precision_contract_on_cuda():
    """dtype 'auto' is bf16 autocast on CUDA (train's and the sampler's contexts); 'float32' is no autocast."""
    assert resolve_dtype(CUDA, AUTO) == "bfloat16"
    a = torch.ones(4, 4, device=CUDA)
    with autocast_context(CUDA, AUTO):
        assert (a @ a).dtype == torch.bfloat16
    with autocast_context(CUDA, "float32"):
        assert (a @ a).dtype == torch.float32
    assert Sampling().dtype == "auto"


@pytest.mark.parametrize("quantizer", ["vq2", "ema"])
def test_vqgan_cpu_and_cuda_agree_and_cuda_weights_load_on_cpu(tmp_path, quantizer):
    cpu = tiny_vqgan(quantizer)
    gpu = copy.deepcopy(cpu).to(CUDA).eval()
    x = to_model_input(blobs(6, seed=1), 16)
    with strict_fp32(), torch.no_grad():
        e_cpu, e_gpu = cpu.encode(x), gpu.encode(x.to(CUDA))
        z = cpu.quant_conv(cpu.encoder(x))
        # the GPU's indices are nearest codes too: where they differ from the CPU's, it is a distance near-tie
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        dist = torch.cdist(flat.double(), cpu.codebook.detach().double())
        i_cpu, i_gpu = e_cpu.indices.reshape(-1, 1), e_gpu.indices.cpu().reshape(-1, 1)
        gap = (dist.gather(1, i_gpu) - dist.gather(1, i_cpu)).abs()[:, 0]
        assert float(gap.max()) < 1e-4, f"GPU picked a code {float(gap.max()):.2e} farther than the CPU's"
        agree = float((i_cpu == i_gpu).double().mean())
        assert agree >= 0.98, agree
        # the quantized latents are exactly the codebook rows of the indices, on the GPU as well
        assert torch.equal(e_gpu.quant, gpu.codebook[e_gpu.indices].permute(0, 3, 1, 2))
        # decoding the same grids
        d_cpu, d_gpu = cpu.decode_code(e_cpu.indices), gpu.decode_code(e_cpu.indices.to(CUDA))
        assert d_gpu.device.type == CUDA.type and max_abs(d_cpu, d_gpu) < 1e-4
        # the numpy helpers the stages use (tokens, synthesis) on a CUDA model
        grids = cpu.tokenize(blobs(5, size=40, seed=2))
        assert (grids == gpu.tokenize(blobs(5, size=40, seed=2))).mean() >= 0.98
        assert np.abs(cpu.decode_tokens(grids) - gpu.decode_tokens(grids)).max() < 1e-4
    # written on CUDA, read on the CPU (and on CUDA): same weights, same outputs
    gpu.save(tmp_path / "vq")
    back = VQGAN.load(tmp_path / "vq", device="cpu")
    again = VQGAN.load(tmp_path / "vq", device=CUDA)
    assert back.device.type == "cpu" and again.device.type == CUDA.type
    for k, v in gpu.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.cpu()), k
    with strict_fp32(), torch.no_grad():
        assert torch.equal(back.encode(x).indices, e_cpu.indices)
        assert max_abs(again.decode_code(e_cpu.indices.to(CUDA)), d_gpu) < 1e-6


@pytest.mark.parametrize("quantizer", ["vq2", "ema"])
def test_vqgan_bf16_autocast_keeps_the_nearest_code_search_in_fp32(quantizer):
    """Under bf16 autocast (the codebook stage's training context on CUDA) the quantizer still works in float32:
    quant is float32 and exactly the codebook rows, each index is the nearest code of its latent."""
    model = tiny_vqgan(quantizer).to(CUDA)
    x = to_model_input(blobs(6, seed=3), 16).to(CUDA)
    with torch.no_grad(), autocast_context(CUDA, AUTO):
        enc = model.encode(x)
        z = model.quant_conv(model.encoder(x))
        rec = model.decode(enc.quant)
    assert z.dtype == torch.bfloat16                       # autocast really is on around the quantizer
    assert enc.quant.dtype == torch.float32 and enc.indices.dtype == torch.int64
    assert torch.equal(enc.quant, model.codebook[enc.indices].permute(0, 3, 1, 2).float())
    flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    with strict_fp32():
        dist = torch.cdist(flat.double(), model.codebook.detach().double())
    chosen = dist.gather(1, enc.indices.reshape(-1, 1))[:, 0]
    assert float((chosen - dist.min(1).values).max()) < 1e-4
    assert torch.isfinite(rec.float()).all()


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_generator_logits_and_kv_cache_on_cuda(tmp_path, arch):
    cpu = tiny_generator(ModelSpec(arch=arch, d_model=64, n_layers=2, n_heads=4))
    gpu = moved(cpu, CUDA)
    lay = cpu.layout
    rng = np.random.default_rng(0)
    prompts = encoded(cpu, TEXTS[:5])
    ids = torch.tensor([p[0] + (rng.integers(0, K, lay.n_image_tokens) + lay.img_offset).tolist() for p in prompts])
    mask = torch.tensor([p[1] + [1] * lay.n_image_tokens for p in prompts])
    with strict_fp32(), torch.no_grad():
        l_cpu = cpu.logits(ids, mask)
        l_gpu = gpu.logits(ids.to(CUDA), mask.to(CUDA))
        real = mask.bool()  # padded positions are masked out: their logits mean nothing
        assert max_abs(l_cpu[real], l_gpu[real]) < 1e-4 * max(1.0, float(l_cpu.abs().max()))
        # the image-token loss the generator trains on, both ways
        batch = {"ids": ids, "mask": mask, "codes": ids[:, lay.prompt_len:] - lay.img_offset}
        loss_cpu = image_loss(cpu.model, batch, lay)
        loss_gpu = image_loss(gpu.model, {k: v.to(CUDA) for k, v in batch.items()}, lay)
        assert abs(float(loss_cpu) - float(loss_gpu)) < 1e-4
        # greedy with the KV cache on CUDA == greedy from whole sequences (different attention kernels: q_len 1)
        codes = sample_codes(gpu, prompts[:1], [5], Sampling(temperature=0.0, dtype="float32"))[0].reshape(-1)
        full = torch.tensor([prompts[0][0] + (codes + lay.img_offset).tolist()], device=CUDA)
        fmask = torch.tensor([prompts[0][1] + [1] * len(codes)], device=CUDA)
        logits = gpu.logits(full, fmask)[0, lay.prompt_len - 1:-1, lay.img_offset:lay.img_offset + K].float().cpu()
        top2 = torch.topk(logits, 2, dim=-1).values
        ok = (logits.argmax(-1).numpy() == codes) | (top2[:, 0] - top2[:, 1] < 1e-4).numpy()
        assert ok.all(), f"cached greedy decoding disagrees with the full forward at tokens {np.flatnonzero(~ok)}"
    # written on CUDA, read on the CPU
    gpu.save(tmp_path / "g")
    back = Generator.load(tmp_path / "g", device="cpu")
    assert back.device.type == "cpu" and back.layout == cpu.layout
    with torch.no_grad():
        assert torch.equal(back.logits(ids, mask), l_cpu)


@pytest.mark.parametrize("arch", ["resnet", "densenet"])
def test_classifier_cpu_and_cuda_agree_and_cuda_weights_load_on_cpu(tmp_path, arch):
    cpu = tiny_classifier(arch)
    gpu = copy.deepcopy(cpu).to(CUDA).eval()
    x = random_images(7)
    with strict_fp32():
        p_cpu, p_gpu = cpu.predict(x), gpu.predict(x)
        f_cpu, f_gpu = cpu.features(x), gpu.features(x)
        with torch.no_grad():
            t = torch.from_numpy(x).float()[:, None] / 255.0
            l_cpu, l_gpu = cpu(t), gpu(t.to(CUDA))
    assert p_gpu.shape == (7, 14) and np.abs(p_cpu - p_gpu).max() < 1e-5
    assert np.abs(f_cpu - f_gpu).max() < 1e-4 * max(1.0, float(np.abs(f_cpu).max()))
    assert max_abs(l_cpu, l_gpu) < 1e-4
    assert gpu.weights_digest() == cpu.weights_digest()   # the feature-space name does not depend on the device
    gpu.save(tmp_path / "clf")
    back = Classifier.load(tmp_path / "clf", device="cpu")
    assert np.array_equal(back.predict(x), p_cpu)


# a tiny BERT and the toy alignment data of tests/toys.py

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bert")
    save_tiny_bert(path)
    return path


def test_filip_similarity_cpu_and_cuda_agree():
    g = torch.Generator().manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(5, 9, 16, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(4, 12, 16, generator=g), dim=-1)
    tm = torch.rand(5, 9, generator=g) > 0.3
    tm[:, 0] = True
    pm = torch.rand(4, 12, generator=g) > 0.2
    with strict_fp32():
        for args in ((t, tm, p, pm), (t, tm, p, None)):
            a = filip_similarity(*args)
            b = filip_similarity(*(x.to(CUDA) if x is not None else None for x in args))
            assert b.device.type == CUDA.type and max_abs(a, b) < 1e-5
        pair = filip_similarity(t[:4], tm[:4], p, pm, pairwise=True)
        assert max_abs(pair, filip_similarity(t[:4].to(CUDA), tm[:4].to(CUDA), p.to(CUDA), pm.to(CUDA),
                                              pairwise=True)) < 1e-5
    # gradients flow on CUDA under bf16 autocast (the training context), finite
    tg, pg = t.to(CUDA).requires_grad_(True), p.to(CUDA).requires_grad_(True)
    with autocast_context(CUDA, AUTO):
        s = filip_similarity(tg, tm.to(CUDA), pg, pm.to(CUDA))
    s.float().sum().backward()
    assert torch.isfinite(tg.grad).all() and torch.isfinite(pg.grad).all() and float(pg.grad.abs().sum()) > 0


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen_text", "trainable_text"])
def test_align_scores_cpu_and_cuda_agree_and_cuda_weights_load_on_cpu(tmp_path, tiny_bert, frozen):
    from cxrsynth.models.text_encoders import load_text_encoder

    torch.manual_seed(0)
    if frozen:  # a pretrained encoder from a local folder, frozen: token states cached per model object
        encoder, tok = load_text_encoder(tiny_bert)
    else:
        encoder, tok = scratch_text_encoder(list(KINDS), vocab_size=80, hidden=16, layers=1, heads=2,
                                            max_length=32, workdir=tmp_path / "w")
    cfg = AlignConfig(grid=(4, 4), codebook_size=16, code_dim=8, text_hidden=16, embed_dim=16, patch_dim=16,
                      patch_layers=1, patch_heads=2, patch_window=1, text_head_layers=1, text_head_heads=2,
                      max_length=32, background_codes=(0,), background_border=0, text_frozen=frozen)
    codebook = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    model = AlignModel(cfg, encoder, tok, codebook).eval()
    model.save(tmp_path / "a")
    cpu = AlignModel.load(tmp_path / "a", device="cpu")
    gpu = AlignModel.load(tmp_path / "a", device=CUDA)
    val = toy_pairs(2, 1)
    with strict_fp32():
        s_cpu, s_gpu = cpu.score(val.texts, val.grids), gpu.score(val.texts, val.grids)
        m_cpu, m_gpu = (cpu.similarity_matrix(val.texts, val.grids, batch_size=3),
                        gpu.similarity_matrix(val.texts, val.grids, batch_size=3))
        w_cpu, map_cpu = cpu.similarity_map(val.texts[0], val.grids[0])
        w_gpu, map_gpu = gpu.similarity_map(val.texts[0], val.grids[0])
    assert s_gpu.dtype == np.float64 and np.abs(s_cpu - s_gpu).max() < 1e-5
    assert np.abs(m_cpu - m_gpu).max() < 1e-5 and np.allclose(np.diagonal(m_gpu), s_gpu, atol=1e-5)
    assert w_cpu == w_gpu and np.abs(map_cpu - map_gpu).max() < 1e-5
    # written from the CUDA model, read on the CPU
    gpu.save(tmp_path / "b")
    back = AlignModel.load(tmp_path / "b", device="cpu")
    assert np.abs(back.score(val.texts, val.grids) - s_cpu).max() < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# sampling on CUDA

@pytest.fixture(scope="module")
def sampler_gen():
    return tiny_generator()


SAMPLINGS = [Sampling(batch_size=3, dtype="float32"),
             Sampling(temperature=0.0, dtype="float32"),
             Sampling(temperature=2.0, top_k=5, top_p=0.9, batch_size=4, dtype="float32"),
             Sampling(guidance_scale=3.0, batch_size=2, dtype="float32")]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["default", "greedy", "topk_topp", "guidance"])
def test_sampled_codes_on_cuda_equal_the_cpu_ones_in_fp32(sampler_gen, sampling):
    """The sampler draws every uniform on the CPU from the image's own seed and filters the logits in float64 on the
    CPU, so in float32 the device changes nothing but logit rounding: the codes must be the CPU's."""
    gpu = moved(sampler_gen, CUDA)
    texts = TEXTS[:7]
    prompts, views = encoded(sampler_gen, texts, "PA"), ["PA"] * len(texts)
    seeds = [101 + 7 * i for i in range(len(texts))]
    with strict_fp32():
        a = sample_codes(sampler_gen, prompts, seeds, sampling, views=views)
        b = sample_codes(gpu, prompts, seeds, sampling, views=views)
    assert b.shape == (len(texts), *GRID) and b.min() >= 0 and b.max() < K
    assert_same_codes(sampler_gen, prompts, views, seeds, sampling, a, b, f"CPU vs CUDA ({sampling})")


@pytest.mark.parametrize("dtype", ["float32", AUTO])
def test_sampling_on_cuda_is_repeatable_and_batch_invariant(sampler_gen, dtype):
    """Same seeds, same codes (twice on one GPU, bit for bit); an image sampled alone, or in batches of another
    size, equals the one sampled in a batch: the sampler's promise, on which regenerating one image from its manifest
    row and sharding `synthesize` rely. In float32 a rounding near-tie may excuse one image; with bf16 autocast (the
    default on CUDA) the check is exact, as the promise is."""
    gpu = moved(sampler_gen, CUDA)
    seen: list[tuple[bool, torch.dtype]] = []
    hook = gpu.model.register_forward_pre_hook(
        lambda m, a: seen.append((torch.is_autocast_enabled(CUDA.type), torch.get_autocast_dtype(CUDA.type))))
    texts = TEXTS[:8]
    prompts, views = encoded(sampler_gen, texts, "AP"), ["AP"] * len(texts)
    seeds = [11 + i for i in range(len(texts))]
    try:
        with strict_fp32():
            big = sample_codes(gpu, prompts, seeds, Sampling(batch_size=8, dtype=dtype), views=views)
            again = sample_codes(gpu, prompts, seeds, Sampling(batch_size=8, dtype=dtype), views=views)
            small = sample_codes(gpu, prompts, seeds, Sampling(batch_size=3, dtype=dtype), views=views)
            alone = np.concatenate([sample_codes(gpu, [prompts[i]], [seeds[i]], Sampling(batch_size=1, dtype=dtype),
                                                 views=views[i:i + 1]) for i in range(len(texts))])
            guided = Sampling(batch_size=8, guidance_scale=2.0, top_k=8, dtype=dtype)
            g_big = sample_codes(gpu, prompts, seeds, guided, views=views)
            g_alone = np.concatenate([sample_codes(gpu, [prompts[i]], [seeds[i]], dataclasses.replace(guided,
                                                   batch_size=1), views=views[i:i + 1]) for i in range(len(texts))])
            other = sample_codes(gpu, prompts, [s + 1000 for s in seeds], Sampling(batch_size=8, dtype=dtype),
                                 views=views)
    finally:
        hook.remove()
    expect = torch.bfloat16 if resolve_dtype(CUDA, dtype) == "bfloat16" else None
    assert seen and all(on == (expect is not None) and (expect is None or dt == expect) for on, dt in seen), \
        f"autocast during sampling with dtype={dtype}: {set(seen)}"
    assert np.array_equal(big, again), "the same seeds gave other codes on the same GPU"
    assert all(not np.array_equal(big[i], other[i]) for i in range(len(texts))), "other seeds, same codes"
    for name, got, ref_sampling, ref in (("batch 3 vs 8", small, Sampling(dtype=dtype), big),
                                         ("alone vs batch 8", alone, Sampling(dtype=dtype), big),
                                         ("guided alone vs batch 8", g_alone, guided, g_big)):
        if expect is None:
            assert_same_codes(sampler_gen, prompts, views, seeds, ref_sampling, ref, got, f"{name} ({dtype})")
        else:
            differ = [i for i in range(len(texts)) if not np.array_equal(ref[i], got[i])]
            assert not differ, (f"{name} with bf16 autocast on CUDA: images {differ} of {len(texts)} differ "
                                "(batch composition changes the bf16 logits enough to flip draws)")


def test_synthesize_on_cuda_matches_cpu_and_decoding_does_not_depend_on_the_batch(sampler_gen):
    """End to end (key patches, codes, pixels): the float32 CUDA run gives the CPU's codes and (up to one grey level)
    its images; `decode` pads every chunk to the same size, so an image decodes identically alone or with others."""
    gen = sampler_gen
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(image_size=32, channels=32, channel_mult=(1, 1, 2), z_channels=8, embed_dim=8,
                           codebook_size=K, quantizer="vq2")).eval()
    prompts = [PromptRecord("s000", TEXTS[0], "PA", "sampled", terms_of_text(TEXTS[0])),
               PromptRecord("s001", TEXTS[1], "AP", "sampled", terms_of_text(TEXTS[1]), seed=3),
               PromptRecord("s002", TEXTS[2], "PA", "sampled", terms_of_text(TEXTS[2]))]
    sampling = Sampling(batch_size=4, dtype="float32")
    with strict_fp32():
        a = synthesize(gen, vq, prompts, sampling, base_seed=0, samples_per_prompt=2, progress=False)
        b = synthesize(moved(gen, CUDA), copy.deepcopy(vq).to(CUDA).eval(), prompts, sampling, base_seed=0,
                       samples_per_prompt=2, progress=False)
        assert [r["seed"] for r in a.rows] == [r["seed"] for r in b.rows]
        enc = [gen.encode_prompt(p.text, gen.key_patches(p.terms), p.view) for p in prompts for _ in range(2)]
        views = [p.view for p in prompts for _ in range(2)]
        assert_same_codes(gen, enc, views, [r["seed"] for r in a.rows], sampling, a.codes, b.codes,
                          "synthesize CPU vs CUDA")
        same = [i for i in range(len(a.codes)) if np.array_equal(a.codes[i], b.codes[i])]
        assert b.images.dtype == np.uint8 and b.images.shape == (6, 32, 32)
        assert np.abs(a.images[same].astype(int) - b.images[same].astype(int)).max() <= 1
        vq_gpu = copy.deepcopy(vq).to(CUDA).eval()
        assert np.array_equal(decode(vq_gpu, b.codes), b.images)            # the same call: the same bytes
        for i in range(len(b.codes)):                                        # one grid alone: the same bytes too
            assert np.array_equal(decode(vq_gpu, b.codes[i:i + 1])[0], b.images[i]), i


# ----------------------------------------------------------------------------------------------------------------
# the shared training loop on CUDA: bf16 autocast, torch.compile, checkpoints

def flat_tokens(n: int) -> np.ndarray:
    """Each report kind gets its own flat image: learnable in a few steps."""
    return np.stack([np.full(GRID, 1 + 3 * (i % 4)) for i in range(n)])


def recording(loss_fn, record: dict):
    """Wrap a loss so that each call notes the loss, the logs, the autocast state and the module it ran through."""
    def wrapped(net, batch):
        loss, logs = loss_fn(net, batch)
        record.setdefault("loss", []).append(float(loss.detach()))
        record.setdefault("logs", []).append({k: float(v) for k, v in logs.items()})
        record.setdefault("autocast", []).append((torch.is_autocast_enabled(CUDA.type),
                                                  torch.get_autocast_dtype(CUDA.type)))
        record.setdefault("compiled", []).append(hasattr(net, "_orig_mod"))
        record.setdefault("dtype", []).append(loss.dtype)
        return loss, logs
    return wrapped


def test_generator_trains_under_bf16_autocast_and_its_fp32_weights_load_on_cpu(tmp_path):
    gen = tiny_generator(ModelSpec(d_model=32, n_layers=1, n_heads=2))
    data = training_data(gen, TEXTS, ["PA"] * len(TEXTS), flat_tokens(len(TEXTS)), terms_of_text)
    batch = sequence_batch(gen.layout, data.prompt, data.mask, data.codes)
    with torch.no_grad():
        before = float(image_loss(gen.model, batch, gen.layout))
    cfg = TrainConfig(max_steps=30, lr=1e-2, device=CUDA.type, dtype=AUTO, progress=False, log_every=0,
                      out_dir=str(tmp_path / "ckpt"), desc="gpu-test")
    s = training_setup(gen, data, data, cfg, batch_size=12, prompt_dropout=0.0, seed=0)
    rec: dict = {}
    train(s.model, recording(s.loss_fn, rec), s.batches, s.cfg)
    # every step ran under bf16 autocast, with a finite, float32 loss that went down
    assert all(on and dt == torch.bfloat16 for on, dt in rec["autocast"]), set(rec["autocast"])
    assert all(dt == torch.float32 for dt in rec["dtype"])
    losses = np.array(rec["loss"])
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.5 * losses[:5].mean(), losses
    # the weights stay float32 parameters on the GPU; the checkpoint holds float32 tensors under the model's names
    assert all(p.dtype == torch.float32 and p.device.type == CUDA.type for p in gen.model.parameters())
    saved = safetensors.torch.load_file(str(tmp_path / "ckpt" / "last" / "model.safetensors"))
    assert set(saved) == set(gen.model.state_dict())
    assert all(t.dtype == torch.float32 for t in saved.values() if t.is_floating_point())
    # ... and load into a CPU model (built with another seed) as exactly the GPU's weights
    cpu = tiny_generator(ModelSpec(d_model=32, n_layers=1, n_heads=2), seed=1)
    load_weights(cpu.model, tmp_path / "ckpt" / "last" / "model.safetensors", "cpu")
    for k, v in gen.model.state_dict().items():
        assert torch.equal(cpu.model.state_dict()[k], v.cpu()), k
    gen.model.eval()
    cpu.model.eval()
    with strict_fp32(), torch.no_grad():
        after_cpu = float(image_loss(cpu.model, batch, gen.layout))
        after_gpu = float(image_loss(gen.model, {k: v.to(CUDA) for k, v in batch.items()}, gen.layout))
        l_cpu = cpu.logits(batch["ids"], batch["mask"])
        l_gpu = gen.logits(batch["ids"].to(CUDA), batch["mask"].to(CUDA))
    assert after_cpu < 0.5 * before and abs(after_cpu - after_gpu) < 1e-3 * max(1.0, after_cpu)
    real = batch["mask"].bool()  # padded positions are masked out: their logits mean nothing
    assert max_abs(l_cpu[real], l_gpu[real]) < 1e-4 * max(1.0, float(l_cpu[real].abs().max()))
    # the model folder written from the GPU loads on the CPU with the same logits
    gen.save(tmp_path / "g")
    back = Generator.load(tmp_path / "g", device="cpu")
    with torch.no_grad():
        assert torch.equal(back.logits(batch["ids"], batch["mask"]), l_cpu)


def test_compiled_generator_training_matches_eager(tmp_path):
    """compile=True: the loop runs the compiled module, its losses follow the eager run's (bf16 autocast both), and
    the checkpoint holds the plain model's names (no `_orig_mod.` prefix)."""
    import torch._dynamo

    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        gen = tiny_generator(ModelSpec(d_model=32, n_layers=1, n_heads=2))
        data = training_data(gen, TEXTS, ["PA"] * len(TEXTS), flat_tokens(len(TEXTS)), terms_of_text)
        cfg = TrainConfig(max_steps=8, lr=5e-3, device=CUDA.type, dtype=AUTO, compile=compiled, progress=False,
                          log_every=0, out_dir=str(tmp_path / f"ckpt{int(compiled)}"))
        s = training_setup(gen, data, data, cfg, batch_size=12, prompt_dropout=0.0, seed=0)
        rec: dict = {}
        train(s.model, recording(s.loss_fn, rec), s.batches, s.cfg)
        runs[compiled] = (rec, gen)
    torch._dynamo.reset()
    eager, comp = runs[False][0], runs[True][0]
    assert all(comp["compiled"]) and not any(eager["compiled"])
    le, lc = np.array(eager["loss"]), np.array(comp["loss"])
    assert np.isfinite(lc).all() and lc[-1] < lc[0]
    assert abs(lc[0] - le[0]) <= 1e-2 * abs(le[0]), (le, lc)        # same weights, same batch: rounding only
    assert np.allclose(lc, le, rtol=5e-2), (le, lc)
    saved = safetensors.torch.load_file(str(tmp_path / "ckpt1" / "last" / "model.safetensors"))
    assert set(saved) == set(runs[True][1].model.state_dict())
    assert not any(k.startswith("_orig_mod") for k in saved)


def test_vqgan_trains_on_cuda_under_bf16_autocast_including_the_gan_phase(tmp_path):
    images = blobs(4, seed=5)
    p = CodebookParams(image_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                       z_channels=32, embed_dim=8, codebook_size=64, quantizer="ema", disc_layers=1,
                       disc_channels=8, steps=150, batch_size=4, lr=3e-3, warmup_steps=10, disc_start=120,
                       disc_weight=0.1, eval_every=150, checkpoint_every=150, dtype=AUTO)
    s = vqgan_training_setup(p, images, images, device=CUDA.type, out_dir=tmp_path / "ckpt", progress=False)
    before = reconstruction_metrics(s.trainer.vqgan, images)
    rec: dict = {}
    train(s.trainer, recording(s.loss_fn, rec), s.batches, s.cfg, s.evaluate)
    assert all(on and dt == torch.bfloat16 for on, dt in rec["autocast"])
    losses = np.array(rec["loss"])
    assert np.isfinite(losses).all()
    gan = [lg for lg in rec["logs"][120:]]
    assert all("g_loss" in lg and "d_loss" in lg for lg in gan) and not any("d_loss" in lg for lg in rec["logs"][:120])
    assert all(math.isfinite(v) for lg in rec["logs"] for v in lg.values())
    l1 = np.array([lg["l1"] for lg in rec["logs"]])
    assert l1[110:120].mean() < 0.35 * l1[:10].mean(), (l1[:10], l1[110:120])
    vq = s.trainer.vqgan.eval()
    with strict_fp32():
        after = reconstruction_metrics(vq, images)
    assert after["psnr"] > before["psnr"] + 8 and after["psnr"] > 22, (before, after)
    assert all(t.dtype == torch.float32 for t in safetensors.torch.load_file(
        str(tmp_path / "ckpt" / "last" / "model.safetensors")).values() if t.is_floating_point())
    # the trained VQ-GAN, written from the GPU, tokenizes and decodes the same on the CPU
    vq.save(tmp_path / "vq")
    back = VQGAN.load(tmp_path / "vq", device="cpu")
    with strict_fp32():
        g_gpu, g_cpu = vq.tokenize(images), back.tokenize(images)
        assert (g_gpu == g_cpu).mean() >= 0.98
        assert np.abs(vq.decode_tokens(g_cpu) - back.decode_tokens(g_cpu)).max() < 1e-4


def test_classifier_fit_on_cuda_under_bf16_selects_and_reloads_on_cpu(tmp_path):
    params = ClassifierParams(input_size=32, width=4, depth=(1, 1), epochs=6, batch_size=16, lr=1e-2,
                              warmup_epochs=0.5, min_count=3, checkpoint_every_epochs=3, ema_decay=0.9,
                              aug_rotate_deg=3.0, aug_scale_min=0.95, dtype=AUTO)
    train_set, val_set, test_set = labeled_squares(64, 0), labeled_squares(24, 1), labeled_squares(24, 2)
    model, result = classifier_fit(params, train_set, val_set, seed=0, device=CUDA.type,
                                   out_dir=tmp_path / "ckpt", progress=False)
    assert model.device.type == CUDA.type and result.step == 24 and result.best_step is not None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with strict_fp32():
        report, _, probs = split_report(model, test_set, min_count=3, n_boot=20)
    assert report["macro_auroc"] > 0.9, report["macro_auroc"]
    model.save(tmp_path / "clf")
    back = Classifier.load(tmp_path / "clf", device="cpu")
    assert np.abs(back.predict(test_set.images) - probs).max() < 1e-5


@pytest.mark.parametrize("text_encoder", ["scratch", "pretrained"])
def test_align_fit_on_cuda_hands_back_a_working_cpu_model(tmp_path, tiny_bert, text_encoder):
    """align.fit on CUDA (bf16 autocast; a frozen encoder's token states cached on the CPU beforehand) returns a CPU
    model that ranks matching pairs first, gives the same scores when moved back to CUDA, and builds the same bank."""
    p = AlignParams(text_encoder=text_encoder, text_model_path=str(tiny_bert) if text_encoder == "pretrained" else "",
                    freeze_text=True, scratch_hidden=32, scratch_layers=1, scratch_heads=2, text_head_layers=0,
                    embed_dim=32, patch_dim=32, patch_layers=0, patch_heads=2, steps=80, batch_size=8, lr=3e-3,
                    warmup_steps=5, eval_every=40, checkpoint_every=40, mask_background=False, dtype=AUTO)
    train_pairs, val = toy_pairs(6, 0), toy_pairs(2, 1)
    codebook = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    model, result = align_fit(p, train_pairs, val, codebook, seed=0, device=CUDA.type, progress=False,
                              workdir=tmp_path / "w", out_dir=tmp_path / "ckpt")
    assert result.step == 80 and model.device.type == "cpu"
    assert model.config.text_frozen == (text_encoder == "pretrained")
    matched = model.score(val.texts, val.grids)
    shuffled = model.score(val.texts, np.roll(val.grids, 1, axis=0))
    assert np.isfinite(matched).all() and matched.mean() > shuffled.mean()
    r = retrieval_metrics(model.similarity_matrix(val.texts, val.grids), val.groups)
    assert r["text_to_image/R@1"] > r["text_to_image/chance@1"]
    bank_cpu = old_rule_bank(model, train_pairs.texts, train_pairs.grids, per_key=4, min_support=2)
    model.to(CUDA)
    with strict_fp32():
        assert np.abs(model.score(val.texts, val.grids) - matched).max() < 1e-5
        bank_gpu = old_rule_bank(model, train_pairs.texts, train_pairs.grids, per_key=4, min_support=2)
    assert set(bank_gpu.entries) == set(bank_cpu.entries) and bank_cpu.entries
    for key, entries in bank_cpu.entries.items():
        a = [kp.score for kp in entries]
        b = [kp.score for kp in bank_gpu.entries[key]]
        assert np.allclose(a, b, atol=1e-4), key     # ranked scores (robust to cells that tie)
        if len(a) < 2 or a[0] - a[1] > 1e-3:
            assert (entries[0].row, entries[0].col) == (bank_gpu.entries[key][0].row, bank_gpu.entries[key][0].col)
