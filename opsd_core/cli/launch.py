"""Starting one node of a multi-node run through torchrun, and saying in one line why it never
started.

Owns: running the torchrun command of a node with its output relayed, and telling a rendezvous
that never completed (the other nodes did not join within the timeout, or the endpoint could
not be served) from a run that started: the workers leave a mark in a file named by
:data:`STARTED_MARK` as they start.
Does not know: torch, the run config or what the workers do; the torchrun command is built by
``opsd_core.cli.run``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from opsd_core.errors import OpsdError

# The environment variable naming the file a worker touches when it starts.
STARTED_MARK = "OPSD_WORKERS_STARTED_MARK"


class RendezvousError(OpsdError):
    """The nodes of a multi-node run did not meet; no worker started and nothing was written."""


def mark_started() -> None:
    """Called by a worker as it starts: its launcher then knows the rendezvous completed."""
    mark = os.environ.get(STARTED_MARK)
    if mark:
        Path(mark).touch()


def launch_node(command: list[str], endpoint: str, nodes: int, timeout_s: int) -> int:
    """Run ``command`` (torchrun for one node of ``nodes`` meeting at ``endpoint``) and return
    its exit code. torchrun's own output is held back until a worker starts; when torchrun ends
    before any did, it goes to a log file and a :class:`RendezvousError` says what happened in
    one line."""
    with tempfile.TemporaryDirectory(prefix="opsd-launch-") as folder:
        mark = Path(folder) / "started"
        process = subprocess.Popen(command, env={**os.environ, STARTED_MARK: str(mark)}, stderr=subprocess.PIPE)
        held: list[bytes] = []
        relay = threading.Thread(target=_relay, args=(process.stderr, mark, held), daemon=True)
        relay.start()
        code = process.wait()
        relay.join()
        if mark.exists() or code == 0:
            return code
    handle, log = tempfile.mkstemp(prefix="opsd-rendezvous-", suffix=".log")
    with os.fdopen(handle, "wb") as stream:
        stream.writelines(held)
    output = b"".join(held).decode(errors="replace")
    if "RendezvousTimeoutError" in output or "RendezvousClosedError" in output:
        what = (
            f"the {nodes} nodes did not all join the rendezvous at {endpoint} within --rdzv-timeout {timeout_s} s; "
            f"start the same command on every node with its own --node-rank (0 to {nodes - 1}) and the same "
            "--rdzv-endpoint, check that every node reaches that address and port (firewall, name resolution), "
            "or raise --rdzv-timeout"
        )
    else:
        what = (
            f"torchrun stopped (exit {code}) before the rendezvous at {endpoint} completed; check that node 0 "
            "can listen on that port (free, not firewalled) and that the other nodes reach it"
        )
    raise RendezvousError(f"{what}; no process started and nothing was written; torchrun's output is in {log}")


def _relay(stream, mark: Path, held: list[bytes]) -> None:
    """Copy ``stream`` to stderr line by line once ``mark`` exists; hold the lines before."""
    for line in iter(stream.readline, b""):
        if not mark.exists():
            held.append(line)
            continue
        for earlier in held:
            sys.stderr.buffer.write(earlier)
        held.clear()
        sys.stderr.buffer.write(line)
        sys.stderr.buffer.flush()
    if mark.exists():
        for earlier in held:
            sys.stderr.buffer.write(earlier)
        sys.stderr.buffer.flush()
