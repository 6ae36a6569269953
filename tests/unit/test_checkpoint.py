"""Checkpoints: atomic writes, verification, partial and corrupt directories refused."""

import json

import pytest
import torch

from opsd_core.errors import CheckpointError
from opsd_core.trainer.checkpoint import (
    MANIFEST,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    remove_interrupted_saves,
    save_checkpoint,
    verify_checkpoint,
)


def _weights(directory):
    (directory / "student").mkdir()
    (directory / "student" / "model.bin").write_bytes(b"\x01\x02\x03" * 100)


def test_round_trip_of_trainer_state(tmp_path):
    state = {"step": 3, "generator": torch.Generator().manual_seed(1).get_state(), "nested": {"lr": [0.1, 0.2]}}
    path = save_checkpoint(tmp_path, 3, _weights, state)
    assert path.name == "step-0000003"
    loaded = load_trainer_state(path)
    assert loaded["step"] == 3 and loaded["nested"] == {"lr": [0.1, 0.2]}
    assert torch.equal(loaded["generator"], state["generator"])
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"student/model.bin", "trainer_state.pt"}


def test_keep_deletes_older_checkpoints(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, _weights, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]


def test_a_failed_write_leaves_no_checkpoint(tmp_path):
    def broken(directory):
        _weights(directory)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 5, broken, {"step": 5})
    assert list(tmp_path.iterdir()) == []


def test_partial_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, _weights, {"step": 1})
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="partial"):
        latest_checkpoint(tmp_path)


def test_corrupt_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, _weights, {"step": 1})
    (path / "student" / "model.bin").write_bytes(b"\x01\x02\x04" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        verify_checkpoint(path)


def test_missing_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, _weights, {"step": 1})
    (path / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match="missing trainer_state.pt"):
        load_trainer_state(path)


def test_temporary_directories_are_not_checkpoints(tmp_path):
    (tmp_path / ".tmp-step-0000009-123").mkdir()
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "absent") is None


def test_interrupted_saves_are_removed_and_checkpoints_kept(tmp_path):
    kept = save_checkpoint(tmp_path, 1, _weights, {"step": 1})
    (tmp_path / ".tmp-step-0000002-4242" / "student").mkdir(parents=True)
    (tmp_path / ".tmp-step-0000002-4242" / "student" / "model.bin").write_bytes(b"half")
    assert [p.name for p in remove_interrupted_saves(tmp_path)] == [".tmp-step-0000002-4242"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name]
    assert remove_interrupted_saves(tmp_path / "absent") == []


def _rewrite_manifest(path, change):
    manifest = json.loads((path / MANIFEST).read_text())
    change(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(files={}), "does not list trainer_state.pt"),
        (lambda m: m["files"].update({"../../outside": {"bytes": 1, "sha256": "0" * 64}}), "outside the checkpoint"),
        (lambda m: m["files"].update({"/etc/hostname": {"bytes": 1, "sha256": "0" * 64}}), "outside the checkpoint"),
        (lambda m: m["files"].pop("student/model.bin"), "does not list"),
        (lambda m: m.update(files=["trainer_state.pt"]), "unreadable"),
    ],
)
def test_a_manifest_must_list_exactly_the_files_inside(tmp_path, change, message):
    path = save_checkpoint(tmp_path, 1, _weights, {"step": 1})
    _rewrite_manifest(path, change)
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(path)


def test_symbolic_links_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "run", 1, _weights, {"step": 1})
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes((path / "student" / "model.bin").read_bytes())
    (path / "student" / "model.bin").unlink()
    (path / "student" / "model.bin").symlink_to(outside)
    with pytest.raises(CheckpointError, match="symbolic link"):
        verify_checkpoint(path)


def test_an_extra_file_in_a_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, _weights, {"step": 1})
    (path / "student" / "extra.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="does not list.*student/extra.bin"):
        verify_checkpoint(path)


def test_the_model_reader_takes_whole_models_and_names_what_it_cannot(tmp_path):
    from opsd_core.state_dicts import save_safetensors
    from opsd_core.trainer.checkpoint import START_RECORD, read_model_state

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    for name in ("student", "teacher"):
        save_safetensors(model, tmp_path / name / "model.safetensors")
        state = read_model_state(tmp_path, name)
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    with pytest.raises(CheckpointError, match="holds the models student, teacher; got 'ema'"):
        read_model_state(tmp_path, "ema")
    (tmp_path / START_RECORD).write_text("{}")
    with pytest.raises(CheckpointError, match="trainable tensors only; load it over its start model"):
        read_model_state(tmp_path, "student")
