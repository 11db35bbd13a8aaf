"""Model folders: round trip, and damaged folders fail with an error naming the file."""
import json

import pytest
import torch

from cxrsynth.models.folder import ModelFolderError, load_state, read_meta, save_folder


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
