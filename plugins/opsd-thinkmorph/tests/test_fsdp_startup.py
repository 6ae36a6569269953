"""Sharded start-up in 2 CPU processes (gloo): only rank 0 ever holds the whole model.

With several processes the start model is built (or loaded) by rank 0 alone and every rank
receives its shards; the student is cloned from those shards and the EMA teacher from the
student's, so no rank holds more than shards of the three models. Checked here on the debug
flavour: rank 1 never calls ``build_model``; the sharded start model gathers back to exactly the
model one process builds, buffers and dtypes included; a trainer started from the shards
trains bit for bit like one given the whole student; its checkpoint resumes to the same end;
and a model parked in host memory (one shard per rank) comes back unchanged.

The workers run this file as a torchrun script (``test_fsdp_startup.py OUT``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opsd_core.api import Problem, RunConfig, Score, Task
from opsd_core.testing.fsdp import final_weights
from opsd_core.testing.trainer import (
    BatchedSampler,
    Components,
    EmaTeacher,
    JsdDivergence,
    MetricsLog,
    Trainer,
    build_start,
    local_tensors,
    process_group,
    sharded_clone,
    skeleton_mismatch,
    unsharded_copy,
)
from opsd_thinkmorph.backend import ThinkMorphBackend
from opsd_thinkmorph.config import ThinkMorphParams

STEPS = 3
PARAMS = {"flavour": "debug", "generation": False, "vit_max_size": 56, "vit_min_size": 28, "vae_max_size": 64, "vae_min_size": 32}


class CountingBackend(ThinkMorphBackend):
    """The debug flavour, counting how often this process builds the whole model."""

    built = 0

    def build_model(self):
        CountingBackend.built += 1
        return super().build_model()


class StreamTask(Task):
    """Endless seeded problems with stored visual thoughts."""

    def train_problems(self, seed: int, start: int = 0):
        index = start
        while True:
            generator = torch.Generator().manual_seed(seed * 7919 + index)
            yield Problem(
                id=f"p{index}",
                image=torch.rand(3, 28 + 14 * (index % 2), 42, generator=generator),
                question=f"where is the exit {index}?",
                visual_thought=torch.rand(3, 42, 42, generator=generator),
            )
            index += 1

    def eval_problems(self, limit: int | None = None):
        return []

    def score(self, problem: Problem, response: str) -> Score:
        return Score(correct=False, value=0.0)


def run_config() -> RunConfig:
    return RunConfig.model_validate(
        {
            "train": {"samples_per_step": 2, "grad_accum": 2, "checkpoint_every": 2, "log_every": 1},
            "schedule": {"total_steps": STEPS, "warmup_steps": 1},
            "optim": {"lr": 1e-3, "eps": 1e-6},
            "sampling": {"max_completion_tokens": 5},
        }
    )


def make_trainer(directory: Path, ranks, config, backend, student, skeleton=None) -> Trainer:
    greedy = BatchedSampler(backend, 0.0, config.sampling.max_completion_tokens)
    components = Components(
        config, backend, StreamTask(), JsdDivergence(), EmaTeacher(), greedy, backend.context_builder()
    )
    trainer = Trainer(components, student, directory, MetricsLog(directory / "metrics.jsonl"), ranks=ranks, skeleton=skeleton)
    directory.mkdir(parents=True, exist_ok=True)
    return trainer


def _whole(model, skeleton, ranks) -> dict[str, torch.Tensor] | None:
    full = unsharded_copy(model, skeleton, ranks)
    if full is None:
        return None
    return {name: t.clone() for name, t in [*full.named_parameters(), *full.named_buffers()]}


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    config = run_config()
    with process_group(config, torch.device("cpu")) as ranks:
        backend = CountingBackend(ThinkMorphParams(**PARAMS))
        start, skeleton = build_start(backend, config, ranks, torch.device("cpu"))
        built_at_start = CountingBackend.built
        assert not any(p.requires_grad for p in start.parameters())
        whole = _whole(start, skeleton, ranks)
        parked = local_tensors(start)
        back = sharded_clone(parked, skeleton, backend, ranks, config)
        whole_back = _whole(back, skeleton, ranks)
        if ranks.is_main:
            torch.save(whole, out / "start.pt")
            torch.save(whole_back, out / "start-unparked.pt")

        student = sharded_clone(start, skeleton, backend, ranks, config)
        make_trainer(out / "from-shards", ranks, config, backend, student, skeleton).fit(progress=False)

        interrupted = make_trainer(
            out / "from-shards-resumed", ranks, config, backend,
            sharded_clone(start, skeleton, backend, ranks, config), skeleton,
        )  # fmt: skip
        while interrupted.step < 2:
            interrupted._log(interrupted.train_step())
        interrupted.save()
        resumed = make_trainer(
            out / "from-shards-resumed", ranks, config, backend,
            sharded_clone(start, skeleton, backend, ranks, config), skeleton,
        )  # fmt: skip
        resumed.fit(progress=False)

        counts = ranks.gather(built_at_start)
        whole_student = backend.build_model().requires_grad_(True)  # the path without a skeleton
        make_trainer(out / "whole", ranks, config, backend, whole_student).fit(progress=False)
        if ranks.is_main:
            (out / "builds.json").write_text(json.dumps(counts))


# ---------------------------------------------------------------------------------------------- the tests
def _final(directory: Path, name: str) -> dict[str, torch.Tensor]:
    """The last checkpoint's ``name`` weights (sharded: written by the 2 processes)."""
    return final_weights(directory, name, STEPS)


def _metrics(directory: Path) -> list[dict]:
    """Every step's metrics without the timings."""
    lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    return [{key: value for key, value in line.items() if not key.endswith("_s") and key != "peak_memory_gb"} for line in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("startup")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=400, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


@pytest.mark.multiprocess
def test_only_rank_0_builds_the_whole_model(runs):
    assert json.loads((runs / "builds.json").read_text()) == [1, 0]


@pytest.mark.multiprocess
def test_the_sharded_start_model_is_the_model_one_process_builds(runs):
    reference = ThinkMorphBackend(ThinkMorphParams(**PARAMS)).build_model()
    expected = dict([*reference.named_parameters(), *reference.named_buffers()])
    for saved in ("start.pt", "start-unparked.pt"):
        whole = torch.load(runs / saved, weights_only=True)
        assert whole.keys() == expected.keys()
        for name, tensor in expected.items():
            assert whole[name].dtype == tensor.dtype and torch.equal(whole[name], tensor.detach()), f"{saved} {name}"


@pytest.mark.multiprocess
def test_a_trainer_started_from_shards_trains_like_one_given_the_whole_student(runs):
    assert _metrics(runs / "from-shards") == _metrics(runs / "whole")
    for name in ("student", "teacher"):
        expected, actual = _final(runs / "whole", name), _final(runs / "from-shards", name)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert actual[key].dtype == expected[key].dtype and torch.equal(actual[key], expected[key]), f"{name} {key}"


@pytest.mark.multiprocess
def test_a_run_started_from_shards_resumes_to_the_same_end(runs):
    assert _metrics(runs / "from-shards-resumed") == _metrics(runs / "from-shards")
    for name in ("student", "teacher"):
        expected, actual = _final(runs / "from-shards", name), _final(runs / "from-shards-resumed", name)
        for key in expected:
            assert torch.equal(actual[key], expected[key]), f"{name} {key}"


def test_a_skeleton_that_does_not_match_the_model_is_reported():
    backend = ThinkMorphBackend(ThinkMorphParams(**PARAMS))
    skeleton, full = backend.model_skeleton(), backend.build_model()
    assert skeleton_mismatch(skeleton, full) is None
    assert "instead of" in skeleton_mismatch(skeleton.to(torch.float64), full)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
