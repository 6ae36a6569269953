"""opsd_core.state_dicts: finding weight files (single or sharded), checking keys and shapes
with one error that lists every difference, tied parameters, and the save -> load round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from opsd_core import state_dicts
from opsd_core.errors import CheckpointError


class Tied(torch.nn.Module):
    """An embedding and an output head sharing one weight, plus a persistent buffer."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.embed = torch.nn.Embedding(10, width)
        self.hidden = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(width))


def seeded(seed: int, width: int = 4) -> Tied:
    torch.manual_seed(seed)
    return Tied(width)


def test_tied_names_are_the_later_duplicates():
    assert state_dicts.tied_names(seeded(0)) == {"head.weight"}
    assert state_dicts.tied_names(torch.nn.Linear(2, 2)) == set()


def test_save_then_load_round_trips_and_drops_tied_duplicates(tmp_path):
    source, target = seeded(0), seeded(1)
    source.scale.fill_(3.0)
    state_dicts.save_safetensors(source, tmp_path / "model.safetensors")
    stored = state_dicts.read_weights(tmp_path)
    assert "head.weight" not in stored and "scale" in stored
    state_dicts.load_into(target, stored, tmp_path)
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    assert target.head.weight is target.embed.weight


def test_save_casts_to_the_requested_dtype(tmp_path):
    state_dicts.save_safetensors({"x": torch.ones(2, dtype=torch.float64)}, tmp_path / "w.safetensors", torch.float32)
    assert state_dicts.read_safetensors([tmp_path / "w.safetensors"])["x"].dtype == torch.float32


def test_shards_listed_by_the_index_are_read_together(tmp_path):
    model = seeded(0)
    state = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    names = sorted(state)
    save_file({k: state[k] for k in names[:2]}, str(tmp_path / "model-1.safetensors"))
    save_file({k: state[k] for k in names[2:]}, str(tmp_path / "model-2.safetensors"))
    weight_map = {k: ("model-1.safetensors" if k in names[:2] else "model-2.safetensors") for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert [p.name for p in state_dicts.weight_files(tmp_path)] == ["model-1.safetensors", "model-2.safetensors"]
    loaded = state_dicts.read_weights(tmp_path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_stems_are_tried_in_order(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "ema.safetensors"))
    assert state_dicts.weight_files(tmp_path, ("model", "ema")) == [tmp_path / "ema.safetensors"]
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert state_dicts.weight_files(tmp_path, ("model", "ema")) == [tmp_path / "model.safetensors"]


def test_missing_weights_name_what_was_expected_and_what_is_there(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        state_dicts.weight_files(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(state_dicts.WeightsNotFoundError, match=r"model.safetensors or ema.safetensors.*notes.txt"):
        state_dicts.weight_files(tmp_path, ("model", "ema"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-7.safetensors"}}))
    with pytest.raises(CheckpointError, match="shards that are missing: model-7.safetensors"):
        state_dicts.weight_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="weight_map"):
        state_dicts.weight_files(tmp_path)


def test_an_unreadable_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        state_dicts.read_weights(tmp_path)


def test_one_error_lists_missing_unexpected_and_wrongly_shaped_keys():
    model = seeded(0)
    state = {k: v for k, v in model.state_dict().items() if k not in ("head.weight", "scale")}
    state["hidden.weight"] = torch.zeros(5, 4)
    state["extra.bias"] = torch.zeros(1)
    with pytest.raises(state_dicts.WeightsMismatchError) as caught:
        state_dicts.load_into(model, state, "ckpt-dir", missing_hint=" (hint)")
    message = str(caught.value)
    assert message.startswith("weights in ckpt-dir do not fit the model: ")
    assert "1 missing keys (hint): scale" in message  # head.weight is tied: not required
    assert "1 unexpected keys: extra.bias" in message
    assert "1 shape mismatches: hidden.weight: file (5, 4), model (4, 4)" in message
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, CheckpointError)


def test_a_failed_check_leaves_the_model_untouched():
    model, before = seeded(0), seeded(0).state_dict()
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    state["extra"] = torch.zeros(1)
    with pytest.raises(state_dicts.WeightsMismatchError):
        state_dicts.load_into(model, state, "x")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_long_key_lists_are_cut_with_a_count():
    expected = {f"layer.{i}": torch.zeros(1) for i in range(10)}
    report = state_dicts.compare_keys(expected, {})
    assert len(report.missing) == 10
    assert report.describe().endswith("(+4 more)") and "layer.5" in report.describe()
    assert not state_dicts.compare_keys(expected, expected)
    assert not state_dicts.compare_keys(expected, {}, optional=expected)


def test_optional_keys_keep_the_models_values():
    model = seeded(0)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items() if k != "scale"}
    state_dicts.load_into(model, state, "x", optional=["scale"])
    assert torch.equal(model.scale, torch.ones(4)) and torch.equal(model.hidden.weight, torch.zeros(4, 4))


def test_missing_files_reports_alternatives_together(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "vocab.json").write_text("{}")
    required = ("config.json", "tokenizer_config.json", ("model.safetensors", "model.safetensors.index.json"), ("tokenizer.json", "vocab.json"))
    assert state_dicts.missing_files(tmp_path, required) == [
        "tokenizer_config.json",
        "model.safetensors (or model.safetensors.index.json)",
    ]


def test_sharded_save_splits_above_the_size_and_reads_back_whole(tmp_path):
    tensors = {"a": torch.randn(10), "big": torch.randn(40), "b": torch.randn(5), "c": torch.randn(5)}
    written = state_dicts.save_sharded_safetensors(tensors, tmp_path, "ema", torch.bfloat16, max_shard_bytes=30)
    index = json.loads((tmp_path / "ema.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 60 * 2
    assert index["weight_map"] == {
        "a": "ema-00001-of-00003.safetensors",
        "big": "ema-00002-of-00003.safetensors",  # larger than a shard: alone in one
        "b": "ema-00003-of-00003.safetensors",
        "c": "ema-00003-of-00003.safetensors",
    }
    assert [path.name for path in written][-1] == "ema.safetensors.index.json"
    state = state_dicts.read_weights(tmp_path, ("ema",))
    assert all(torch.equal(state[name], tensor.to(torch.bfloat16)) for name, tensor in tensors.items())
    single = tmp_path / "single"
    assert state_dicts.save_sharded_safetensors(tensors, single, "ema", max_shard_bytes=240) == [single / "ema.safetensors"]
