"""Node 0 of a two-node run whose other node never starts: one line after --rdzv-timeout,
naming the endpoint, the wait and what to check; nothing written in the run directory."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

QUICKSTART = str(Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.multiprocess
def test_node_0_waiting_for_a_node_that_never_joins_ends_in_one_line(tmp_path):
    endpoint = f"127.0.0.1:{_free_port()}"
    command = [
        sys.executable, "-m", "opsd_core", "run", QUICKSTART, "--set", f"run.output_dir='{tmp_path / 'runs'}'",
        "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", endpoint, "--rdzv-timeout", "5",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"did not all join the rendezvous at {endpoint} within --rdzv-timeout 5 s" in lines[0]
    assert not (tmp_path / "runs").exists()
    Path(re.search(r"output is in (\S+\.log)", lines[0]).group(1)).unlink()
