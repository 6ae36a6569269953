"""Sharded checkpoints (``sharded/``, torch.distributed.checkpoint) in one process: a world of
one rank writes them as a multi-process run does; they are read back whole without a process
group, verified by the manifest like any checkpoint, and refused for other models; they hold
tensors only, and their pickled metadata may name nothing but the library's descriptions.

The 2-process runs, and N -> M resumes, are in plugins/opsd-thinkmorph/tests/test_fsdp.py.
"""

import json
import pickle

import pytest
import torch

from opsd_core.errors import CheckpointError
from opsd_core.runtime import Ranks
from opsd_core.testing.fsdp import one_process_group
from opsd_core.trainer import checkpoint, sharded_state


def _trained(seed: int, width: int = 3):
    """(student, teacher, optimizer) after one AdamW step; the second layer never gets a
    gradient, so it has no optimizer state."""
    torch.manual_seed(seed)
    student = torch.nn.Sequential(torch.nn.Linear(width, 4), torch.nn.Linear(4, 2))
    teacher = torch.nn.Sequential(torch.nn.Linear(width, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.1)
    student[0](torch.ones(2, width)).square().sum().backward()
    optimizer.step()
    return student, teacher, optimizer


@pytest.fixture
def saved(tmp_path):
    student, teacher, optimizer = _trained(0)
    with one_process_group():
        groups = sharded_state.optimizer_param_groups(student, optimizer)
        path = checkpoint.save_checkpoint(
            tmp_path,
            7,
            lambda directory: sharded_state.save_sharded(directory, student, teacher, optimizer),
            {"step": 7, "optimizer_param_groups": groups},
            ranks=Ranks(),
        )
    return path, student, teacher, optimizer


def test_a_sharded_checkpoint_round_trips(saved):
    path, student, teacher, optimizer = saved
    assert checkpoint.is_sharded(path)
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    assert manifest["processes"] == 1 and "sharded/.metadata" in manifest["files"]
    assert checkpoint.sharded_entries(path)["student.0.weight"] == (4, 3)
    for role, model in (("student", student), ("teacher", teacher)):
        read = checkpoint.read_sharded_weights(path, role)
        assert read.keys() == model.state_dict().keys()
        assert all(torch.equal(read[key], value) for key, value in model.state_dict().items())

    fresh_student, fresh_teacher, _ = _trained(1)
    fresh_optimizer = torch.optim.AdamW(fresh_student.parameters(), lr=0.1)
    groups = checkpoint.load_trainer_state(path)["optimizer_param_groups"]
    sharded_state.load_sharded(path, fresh_student, fresh_teacher, fresh_optimizer, groups)
    for want, got in ((student, fresh_student), (teacher, fresh_teacher)):
        assert all(torch.equal(a, b) for a, b in zip(want.state_dict().values(), got.state_dict().values()))
    want, got = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert sorted(got["state"]) == sorted(want["state"]) == [0, 1]  # the second layer has no state
    assert got["param_groups"] == want["param_groups"]
    for index, moments in want["state"].items():
        assert all(torch.equal(value, got["state"][index][name]) for name, value in moments.items())


def test_a_sharded_checkpoint_of_other_models_is_refused_in_one_line(saved):
    path, *_ = saved
    student, teacher, optimizer = _trained(1, width=5)
    with pytest.raises(CheckpointError) as info:
        sharded_state.load_sharded(path, student, teacher, optimizer, [])
    message = str(info.value)
    assert "\n" not in message
    assert "holds other models than this run builds" in message and "student.0.weight is [4, 3] there, [4, 5] here" in message


def test_a_corrupt_shard_is_refused(saved):
    path, *_ = saved
    shard = next((path / checkpoint.SHARDED).glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is corrupt"):
        checkpoint.read_sharded_weights(path, "student")


def test_reading_weights_of_a_whole_model_checkpoint_says_what_it_lacks(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path, 1, lambda directory: (directory / "student").mkdir(), {"step": 1})
    with pytest.raises(CheckpointError, match="holds no sharded/ directory"):
        checkpoint.read_sharded_weights(path, "student")


def test_only_tensors_are_sharded_and_the_metadata_may_name_nothing_else(saved):
    path, *_ = saved
    assert all(shape is not None for shape in checkpoint.sharded_entries(path).values())
    metadata = path / checkpoint.SHARDED / ".metadata"
    metadata.write_bytes(pickle.dumps(print))
    with pytest.raises(CheckpointError, match=r"unreadable sharded/ \(builtins.print is not allowed in checkpoint metadata\)"):
        checkpoint.sharded_entries(path)


def test_the_cli_loads_the_student_of_a_sharded_checkpoint(tmp_path):
    from opsd_core.cli.run import _load, _model

    config = _load(None, ())
    _, student = _model(config, None, backend_only=True)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.5)
    optimizer = torch.optim.AdamW(student.parameters())
    with one_process_group():
        path = checkpoint.save_checkpoint(
            tmp_path, 1, lambda directory: sharded_state.save_sharded(directory, student, student, optimizer), {"step": 1}
        )
    _, loaded = _model(config, str(path), backend_only=True)
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in student.state_dict().items())
