"""Checkpoint files: sharded and single-file weights, model vs ema, and the errors for wrong directories."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from opsd_thinkmorph import state_dict
from opsd_thinkmorph.architecture import BagelConfig, debug
from opsd_thinkmorph.model import Bagel


def fresh(seed: int, visual_gen: bool = True) -> Bagel:
    torch.manual_seed(seed)
    return Bagel(debug().with_visual_gen(visual_gen))


def write_single(model: Bagel, directory, stem="model"):
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / f"{stem}.safetensors"))


def equal(a: Bagel, b: Bagel) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_sharded_weights_load_like_a_single_file(tmp_path):
    source = fresh(1)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(tmp_path / name))
    weight_map = {k: name for name, names in shards.items() for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    target = fresh(2)
    state_dict.load_into(target, tmp_path)
    assert equal(source, target)


def test_model_file_is_preferred_and_ema_is_the_fallback(tmp_path):
    model_weights, ema_weights = fresh(1), fresh(2)
    write_single(model_weights, tmp_path, "model")
    write_single(ema_weights, tmp_path, "ema")
    loaded = fresh(3)
    state_dict.load_into(loaded, tmp_path)
    assert equal(loaded, model_weights)
    state_dict.load_into(loaded, tmp_path, "ema")
    assert equal(loaded, ema_weights)
    (tmp_path / "model.safetensors").unlink()
    state_dict.load_into(loaded, tmp_path)
    assert equal(loaded, ema_weights)


def test_official_sin_cos_tables_are_ignored(tmp_path):
    source = fresh(1)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    state["vit_pos_embed.pos_embed"] = torch.randn(4900, 64)
    state["latent_pos_embed.pos_embed"] = torch.randn(4096, 64)
    save_file(state, str(tmp_path / "model.safetensors"))
    target = fresh(2)
    state_dict.load_into(target, tmp_path)
    assert equal(source, target)


def test_missing_directory_and_weights_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        state_dict.weight_files(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"model.safetensors or ema.safetensors.*notes.txt"):
        state_dict.weight_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-1.safetensors"):
        state_dict.weight_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="llm_config.json"):
        BagelConfig.from_directory(tmp_path)


def test_wrong_keys_and_shapes_are_listed(tmp_path):
    source = fresh(1)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    state["language_model.lm_head.weight"] = torch.zeros(10, 64)
    del state["connector.fc1.bias"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as error:
        state_dict.load_into(fresh(2), tmp_path)
    message = str(error.value)
    assert "connector.fc1.bias" in message and "extra.weight" in message and "lm_head.weight" in message


def test_understanding_only_weights_need_generation_disabled(tmp_path):
    source = fresh(1)
    state = {k: v.contiguous() for k, v in source.state_dict().items() if not k.startswith(state_dict.GENERATION_PREFIXES)}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="generation disabled"):
        state_dict.load_into(fresh(2), tmp_path)
    target = fresh(2, visual_gen=False)
    state_dict.load_into(target, tmp_path)
    assert torch.equal(target.language_model.lm_head.weight, source.language_model.lm_head.weight)


def test_save_checkpoint_is_self_contained_and_exact(tmp_path):
    model = fresh(1)
    source = tmp_path / "source"
    source.mkdir()
    (source / "ae.safetensors").write_bytes(b"vae")
    (source / "tokenizer.json").write_text("{}")
    state_dict.save_checkpoint(model, model.config, tmp_path / "out", source=source)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {
        "model.safetensors", "llm_config.json", "vit_config.json", "ae.safetensors", "tokenizer.json"
    }
    assert BagelConfig.from_directory(out) == model.config
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    shutil.rmtree(source)
    assert (out / "ae.safetensors").read_bytes() == b"vae"
