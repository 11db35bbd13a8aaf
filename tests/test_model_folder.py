"""Model folders: round trip, and damaged folders fail with an error naming the file (the generic helper, then every
model folder the pipeline writes: VQ-GAN, classifier, alignment model, generator)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from cxrsynth.keypatches import BankError, KeyPatch, KeyPatchBank
from cxrsynth.models.align import AlignModel
from cxrsynth.models.classifier import Classifier
from cxrsynth.models.folder import ModelFolderError, load_state, read_meta, save_folder
from cxrsynth.models.generator import Generator, GeneratorError
from cxrsynth.models.vqgan import VQGAN


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_round_trip(tmp_path):
    a = net()
    save_folder(a, tmp_path / "m", "demo", 1, {"config": {"width": 3}})
    meta = read_meta(tmp_path / "m", "demo", 1)
    assert meta["config"] == {"width": 3} and meta["format"] == "demo"
    b = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    load_state(b, tmp_path / "m")
    x = torch.randn(5, 4)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("damage, match", [
    ("truncate_weights", "model.safetensors: corrupted or truncated"),
    ("garbage_weights", "model.safetensors: corrupted or truncated"),
    ("drop_weights", "model.safetensors: weights missing"),
    ("garbage_config", "config.json: corrupted config"),
    ("wrong_format", "format 'other' is not 'demo'"),
    ("wrong_version", "format_version 7 is not 1"),
])
def test_damaged_folder_names_the_file(tmp_path, damage, match):
    path = save_folder(net(), tmp_path / "m", "demo", 1, {})
    w, c = path / "model.safetensors", path / "config.json"
    if damage == "truncate_weights":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "garbage_weights":
        w.write_bytes(b"\x00" * 64)
    elif damage == "drop_weights":
        w.unlink()
    elif damage == "garbage_config":
        c.write_text("{not json")
    elif damage == "wrong_format":
        c.write_text(json.dumps({"format": "other", "format_version": 1}))
    elif damage == "wrong_version":
        c.write_text(json.dumps({"format": "demo", "format_version": 7}))
    with pytest.raises(ModelFolderError, match=match):
        read_meta(path, "demo", 1)
        load_state(net(), path)


def test_pickle_payload_is_never_loaded(tmp_path):
    path = save_folder(net(), tmp_path / "m", "demo", 1, {})
    torch.save(net().state_dict(), path / "model.safetensors")  # a pickle where safetensors belongs
    with pytest.raises(ModelFolderError, match="model.safetensors"):
        load_state(net(), path)


# ---------------------------------------------------------------------------------------------------------------
# every real model folder of the pipeline: a damaged file fails loading with one line naming it, and never unpickles

LOADERS = {"vqgan": VQGAN.load, "classifier": Classifier.load, "align": AlignModel.load, "generator": Generator.load}
ERRORS = {"vqgan": ModelFolderError, "classifier": ModelFolderError, "align": ModelFolderError,
          "generator": GeneratorError}


def _build_vqgan(path: Path) -> None:
    from test_vqgan import tiny

    tiny("ema").save(path)


def _build_classifier(path: Path) -> None:
    from test_classifier import tiny

    tiny().save(path)


def _build_align(path: Path) -> None:
    from cxrsynth.config import AlignParams
    from cxrsynth.models.align_training import build_model

    p = AlignParams(text_encoder="scratch", scratch_hidden=16, scratch_layers=1, scratch_heads=2, text_head_layers=0,
                    embed_dim=16, patch_dim=16, patch_layers=0, patch_heads=2)
    torch.manual_seed(0)
    model = build_model(p, ["there is a right pleural effusion ."], torch.randn(16, 8), (4, 4),
                        path.parent / "align-work")
    model.bank = KeyPatchBank((4, 4), 16, {"pleural effusion": [KeyPatch(3, 1, 1, 0.5, "pleural effusion")]})
    model.save(path)


def _build_generator(path: Path) -> None:
    from test_generator import tiny_generator

    tiny_generator().save(path)


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """One tiny saved folder of each kind, built once; each case damages its own copy."""
    root = tmp_path_factory.mktemp("model_folders")
    for kind, build in (("vqgan", _build_vqgan), ("classifier", _build_classifier), ("align", _build_align),
                        ("generator", _build_generator)):
        build(root / kind)
    return root


class _Trap:
    """Unpickling this creates the file `marker`: a pickle that was loaded leaves a trace."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _damage(path: Path, name: str, how: str, marker: Path) -> None:
    f = path / name
    if how == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "garbage":
        f.write_bytes(bytes(range(256)) * 4)
    elif how == "delete":
        f.unlink()
    elif how == "flip":  # one bit of the last tensor's data: a sound file of the right size that loads by itself
        data = bytearray(f.read_bytes())
        data[-1] ^= 1
        f.write_bytes(bytes(data))
    elif how == "pickle":  # torch.save of a state dict where safetensors belongs (plus a trap)
        torch.save({**net().state_dict(), "trap": _Trap(marker)}, f)
    elif how == "pickle_bin":  # the safetensors file gone, a pickle under the name transformers falls back to
        f.unlink()
        torch.save({**net().state_dict(), "trap": _Trap(marker)}, f.parent / "pytorch_model.bin")
    elif how == "drop_tensor":  # a sound file that lacks a weight (transformers would re-initialise it silently)
        import safetensors.torch

        state = safetensors.torch.load_file(str(f))
        state.pop(sorted(state)[0])
        safetensors.torch.save_file(state, str(f), metadata={"format": "pt"})
    elif how == "bad_json":
        f.write_text("{not json")
    elif how == "no_config":  # valid JSON of the right format, its config / layout section gone
        doc = json.loads(f.read_text())
        doc.pop("config" if name == "config.json" else "layout")
        f.write_text(json.dumps(doc))
    else:
        raise AssertionError(how)


WEIGHTS_CASES = [(kind, "model.safetensors", how) for kind in LOADERS
                 for how in ("truncate", "garbage", "delete", "pickle", "flip")]
META_CASES = [(kind, "config.json", how) for kind in ("vqgan", "classifier", "align")
              for how in ("truncate", "bad_json", "no_config")]
ALIGN_CASES = [("align", "text_encoder/model.safetensors", how)
               for how in ("truncate", "garbage", "delete", "pickle", "pickle_bin", "drop_tensor", "flip")] + \
              [("align", "text_encoder/config.json", "truncate"), ("align", "text_encoder/tokenizer.json", "truncate"),
               ("align", "text_encoder/tokenizer.json", "delete"), ("align", "bank.json", "truncate"),
               ("align", "bank.json", "garbage")]
GENERATOR_CASES = [("generator", "model.safetensors", "pickle_bin"), ("generator", "model.safetensors", "drop_tensor"),
                   ("generator", "generator.json", "truncate"),
                   ("generator", "generator.json", "no_config"), ("generator", "config.json", "truncate"),
                   ("generator", "config.json", "bad_json"), ("generator", "tokenizer.json", "truncate"),
                   ("generator", "bank.json", "truncate"), ("generator", "bank.json", "garbage"),
                   ("generator", "bank.json", "delete")]


@pytest.mark.parametrize("kind", LOADERS)
def test_undamaged_model_folders_load(model_folders, kind, tmp_path):
    shutil.copytree(model_folders / kind, tmp_path / kind)
    copy, original = LOADERS[kind](tmp_path / kind), LOADERS[kind](model_folders / kind)
    module = (lambda m: m if isinstance(m, torch.nn.Module) else m.model)  # the generator wraps its network
    state, want = module(copy).state_dict(), module(original).state_dict()
    assert state.keys() == want.keys() and len(state) > 0
    for name, tensor in want.items():
        assert torch.equal(state[name], tensor), name   # a copied folder loads the very same weights


@pytest.mark.parametrize("kind, name, how", WEIGHTS_CASES + META_CASES + ALIGN_CASES + GENERATOR_CASES,
                         ids=lambda v: str(v).replace("/", "-"))
def test_damaged_model_folder_fails_naming_the_file(model_folders, tmp_path, kind, name, how):
    path, marker = tmp_path / kind, tmp_path / "unpickled"
    shutil.copytree(model_folders / kind, path)
    _damage(path, name, how, marker)
    expected = BankError if name == "bank.json" else ERRORS[kind]
    with pytest.raises(expected) as info:
        LOADERS[kind](path)
    msg = str(info.value)
    assert not marker.exists(), "a pickle was unpickled"
    assert "\n" not in msg.strip(), f"not one line: {msg!r}"
    assert Path(name).name in msg and str(path / Path(name).parent) in msg, f"does not name {name}: {msg!r}"


@pytest.mark.parametrize("kind", LOADERS)
def test_a_flipped_byte_is_refused_before_loading_and_size_mode_opts_out(model_folders, tmp_path, kind,
                                                                         monkeypatch):
    """The weight record (weights.sha256.json, written last by every save) catches a flipped byte that the
    safetensors format itself cannot; $CXRSYNTH_WEIGHTS_CHECK=size (documented for multi-GB pretrained LLMs)
    checks sizes only and then loads the damaged weights."""
    path = tmp_path / kind
    shutil.copytree(model_folders / kind, path)
    _damage(path, "model.safetensors", "flip", tmp_path / "unused")
    with pytest.raises(ERRORS[kind], match=r"model.safetensors: corrupted or replaced weights \(sha256"):
        LOADERS[kind](path)
    monkeypatch.setenv("CXRSYNTH_WEIGHTS_CHECK", "size")
    LOADERS[kind](path)  # same size: loads
    monkeypatch.setenv("CXRSYNTH_WEIGHTS_CHECK", "none")
    with pytest.raises(ERRORS[kind], match="CXRSYNTH_WEIGHTS_CHECK: expected sha256 or size"):
        LOADERS[kind](path)


@pytest.mark.parametrize("kind", LOADERS)
def test_a_folder_without_its_weight_record_or_with_an_extra_weight_file_is_refused(model_folders, tmp_path, kind):
    path = tmp_path / kind
    shutil.copytree(model_folders / kind, path)
    shutil.copy(path / "model.safetensors", path / "extra.safetensors")
    with pytest.raises(ERRORS[kind], match="extra.safetensors: weight file not in weights.sha256.json"):
        LOADERS[kind](path)
    (path / "extra.safetensors").unlink()
    (path / "weights.sha256.json").unlink()
    with pytest.raises(ERRORS[kind], match=r"weights.sha256.json: missing \(a save that did not finish"):
        LOADERS[kind](path)
