"""Multi-process helpers that need no process group: mesh sizes, rank slices, the single-process
world, weightless skeletons, and how ``opsd run --nproc-per-node`` (and ``--nnodes``) re-launches
itself, with its bad options and a rendezvous endpoint that does not answer.

The 2-process runs themselves are in plugins/opsd-thinkmorph/tests/test_fsdp.py.
"""

import socket
import sys

import pytest
import torch
from click.testing import CliRunner

from opsd_core.cli import cli
from opsd_core.cli.run import Rendezvous, _run_arguments, torchrun_command
from opsd_core.config import RunConfig
from opsd_core.errors import ConfigError
from opsd_core import runtime
from opsd_core.trainer import optimizer_state, sharding
from opsd_core.runtime import Ranks, mesh_shape


@pytest.mark.parametrize(
    "world, replicate, shard, expected",
    [(8, 1, None, (1, 8)), (8, 2, None, (2, 4)), (8, 2, 4, (2, 4)), (2, 2, 1, (2, 1)), (1, 1, None, (1, 1))],
)
def test_mesh_shape(world, replicate, shard, expected):
    assert mesh_shape(world, replicate, shard) == expected


@pytest.mark.parametrize(
    "world, replicate, shard, fragments",
    [
        (8, 3, None, ["train.replicate", "8 processes", "got 3", "divisor of 8"]),
        (8, 2, 2, ["train.shard", "must equal the number of processes, 8", "shard = 2", "set shard = 4"]),
    ],
)
def test_bad_mesh_names_the_field_and_the_fix(world, replicate, shard, fragments):
    with pytest.raises(ConfigError) as info:
        mesh_shape(world, replicate, shard)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_ranks_take_contiguous_equal_shares():
    problems = list("abcdef")
    assert [Ranks(rank, 3).local_slice(problems) for rank in range(3)] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert Ranks(1, 2).share(6, "train.samples_per_step") == 3
    with pytest.raises(ConfigError, match=r"train.samples_per_step: 3 cannot be split evenly over 2 processes.*multiple of 2"):
        Ranks(0, 2).share(3, "train.samples_per_step")


def test_a_single_process_is_the_world_of_one():
    ranks = Ranks()
    assert ranks.is_main and not ranks.distributed
    values = {"loss": 0.1234567891234, "grad_norm": 2.0}
    assert ranks.mean(values) is values
    assert ranks.broadcast("x") == "x" and ranks.gather("x") == ["x"]
    ranks.barrier()
    with runtime.process_group(RunConfig(), torch.device("cpu")) as joined:
        assert joined == Ranks() and not torch.distributed.is_initialized()


def test_single_process_helpers_do_what_the_trainer_did_before():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    assert sharding.shard(None, model, Ranks(), RunConfig()) == (model, None)
    assert sharding.unsharded_copy(model, None, Ranks()) is model
    saved = optimizer.state_dict()
    optimizer_state.load_optimizer_state_dict(model, optimizer, saved, Ranks())
    assert optimizer.state_dict() == saved
    with sharding.gathered(model) as inside:
        assert inside is model
    loaded = []
    sharding.load_unsharded(model, None, Ranks(), loaded.append)
    assert loaded == [model]


def test_clip_grad_norm_matches_torch_on_plain_tensors():
    first, second = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    second.load_state_dict(first.state_dict())
    for model in (first, second):
        (model(torch.arange(8.0).view(2, 4)) ** 2).sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(list(first.parameters()), 0.5)
    assert sharding.clip_grad_norm(list(second.parameters()), 0.5) == pytest.approx(float(expected), rel=1e-6)
    for a, b in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_meta_skeleton_keeps_structure_and_names_but_no_memory():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model[0].weight.requires_grad_(False)
    skeleton = sharding.meta_skeleton(model)
    assert [name for name, _ in skeleton.named_parameters()] == [name for name, _ in model.named_parameters()]
    assert all(t.is_meta for t in [*skeleton.parameters(), *skeleton.buffers()])
    assert not skeleton[0].weight.requires_grad and skeleton[0].bias.requires_grad
    assert not any(t.is_meta for t in model.parameters())
    full = skeleton.to_empty(device="cpu")
    full.load_state_dict(model.state_dict())
    assert torch.equal(full[0].weight, model[0].weight)


def test_torchrun_relaunch_command():
    arguments = _run_arguments("cfg.toml", ("optim.lr=1e-4", "run.name=x"), "runs/x", True, True)
    assert arguments == [
        "run", "cfg.toml", "--set", "optim.lr=1e-4", "--set", "run.name=x", "--resume", "runs/x", "--no-progress",
        "--allow-changes",
    ]  # fmt: skip
    assert _run_arguments(None, (), None, False, False) == ["run"]
    command = torchrun_command(4, ["run"])
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert command[-1] == "run" and "from opsd_core.cli import main" in command[-2]


def test_nproc_per_node_is_checked(monkeypatch):
    result = CliRunner().invoke(cli, ["run", "--nproc-per-node", "0"])
    assert result.exit_code == 2 and "--nproc-per-node" in result.output and "x>=1" in result.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    result = CliRunner().invoke(cli, ["run", "--nproc-per-node", "4"])
    assert result.exit_code == 2 and "torchrun started 2 processes on this node (got 4)" in result.output


def test_multi_node_torchrun_command():
    rendezvous = Rendezvous.parse(2, 1, "node0.cluster:29500", 60)
    command = torchrun_command(4, ["run"], rendezvous, "my-run")
    assert command[3:10] == [
        "--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=node0.cluster:29500", "--rdzv-id=my-run",
        "--rdzv-conf=is_host=false,join_timeout=60,read_timeout=60", "--nproc-per-node=4",
    ]  # fmt: skip
    assert "is_host=true" in torchrun_command(1, ["run"], Rendezvous.parse(2, 0, "[::1]:29500", 60))[8]
    assert Rendezvous.parse(2, 0, "[::1]:29500", 60).endpoint == "[::1]:29500"


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["--nnodes", "2", "--rdzv-endpoint", "h:1"], "--nnodes 2 needs --node-rank"),
        (["--nnodes", "2", "--node-rank", "0"], "--nnodes 2 needs --rdzv-endpoint"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "nodes are numbered 0 to 1 (got 2)"),
        (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h"], "expected HOST:PORT"),
        (["--node-rank", "1"], "go with --nnodes N > 1"),
    ],
)
def test_bad_multi_node_options_say_what_to_pass(arguments, fragment, tmp_path):
    result = CliRunner().invoke(cli, ["run", "--set", f"run.output_dir='{tmp_path}'", *arguments])
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_a_rendezvous_endpoint_that_does_not_answer_is_one_line_and_writes_nothing(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    arguments = ["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-timeout", "1"]
    result = CliRunner().invoke(cli, ["run", "--set", f"run.output_dir='{tmp_path}'", *arguments])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: --rdzv-endpoint: nothing answered at 127.0.0.1:{port} within 1 s (got '127.0.0.1:{port}'); start "
        "node 0 on that host first, check the address and port, or raise --rdzv-timeout"
    ]
    assert list(tmp_path.iterdir()) == []
