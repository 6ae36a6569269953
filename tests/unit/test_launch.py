"""A node's launcher: torchrun's output is relayed once the workers start; a rendezvous that
never completes is one line with torchrun's output in a log file."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from opsd_core.cli.launch import STARTED_MARK, RendezvousError, launch_node


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_rendezvous_that_times_out_is_one_line_with_the_output_logged(capfd):
    failing = _python(
        "import sys; sys.stderr.write('Traceback (most recent call last):\\n"
        "torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError\\n'); sys.exit(1)"
    )
    with pytest.raises(RendezvousError) as raised:
        launch_node(failing, "node0:29500", 2, 5)
    message = str(raised.value)
    assert "did not all join the rendezvous at node0:29500 within --rdzv-timeout 5 s" in message
    assert "--node-rank (0 to 1)" in message and "nothing was written" in message and "\n" not in message
    assert "Traceback" not in capfd.readouterr().err
    log = Path(re.search(r"output is in (\S+\.log)", message).group(1))
    assert "RendezvousTimeoutError" in log.read_text()
    log.unlink()


def test_torchrun_failing_otherwise_before_the_workers_start_names_the_endpoint():
    with pytest.raises(RendezvousError, match=r"torchrun stopped \(exit 3\) before the rendezvous at h:1 completed") as raised:
        launch_node(_python("import sys; sys.stderr.write('address already in use\\n'); sys.exit(3)"), "h:1", 2, 5)
    Path(re.search(r"output is in (\S+\.log)", str(raised.value)).group(1)).unlink()


def test_once_the_workers_start_their_output_and_exit_code_pass_through(capfd):
    started = _python(
        "import os, pathlib, sys; sys.stderr.write('launcher line\\n'); sys.stderr.flush();"
        f"pathlib.Path(os.environ[{STARTED_MARK!r}]).touch(); sys.stderr.write('worker failed\\n'); sys.exit(7)"
    )
    assert launch_node(started, "node0:29500", 2, 5) == 7
    assert capfd.readouterr().err.splitlines() == ["launcher line", "worker failed"]
