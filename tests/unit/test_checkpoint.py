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
