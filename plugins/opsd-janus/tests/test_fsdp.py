"""FSDP2 training of the janus-pro debug flavour in 2 CPU processes (gloo) equals one process.

Sampling at temperature 1, stored visual thoughts, 3 OPSD steps of 2 problems each (see
:mod:`opsd_core.testing.fsdp`): the per-step metrics and the final student and EMA teacher
weights of a 2-process FSDP run with activation checkpointing match the single-process run
within the harness's tolerances, and the 2-process run resumed from its step-2 checkpoint
equals the uninterrupted one bit for bit.

The 2-process runs execute this file as a torchrun script (``test_fsdp.py OUT``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from opsd_janus.backend import JanusBackend
from opsd_janus.config import JanusParams

from opsd_core.testing import fsdp

pytestmark = pytest.mark.multiprocess


def debug_backend() -> JanusBackend:
    return JanusBackend(JanusParams(flavour="debug", image_size=32, image_tokens=16))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return fsdp.single_and_sharded_runs(__file__, debug_backend, tmp_path_factory.mktemp("janus-fsdp"))


def test_two_processes_equal_one(runs):
    fsdp.assert_same_run(runs / "single", runs / "fsdp", build_backend=debug_backend)


def test_resumed_two_process_run_equals_the_uninterrupted_one(runs):
    fsdp.assert_identical_runs(runs / "fsdp", runs / "fsdp-resumed")


if __name__ == "__main__":
    fsdp.fsdp_worker(debug_backend, Path(sys.argv[1]))
