"""TensorBoard: event files under the run directory's ``trackers/tensorboard/``.

Owns: scalars as ``<phase>/<name>`` against the phase's optimizer step, evaluation results as
``<phase>/eval/<name>``, the resolved config as a text summary, and media as a markdown text
(tokens with their KL) plus the visual thoughts as images.
Does not know: how anything was computed. Needs the ``tensorboard`` package (the writer is
torch's ``SummaryWriter``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from opsd_core.images import to_pil
from opsd_core.interfaces.logger import Logger, MediaSample
from opsd_core.rundir import RunDirectory


class TensorBoardLogger(Logger):
    """One event-file directory per run; ``tensorboard --logdir RUN_DIR/trackers/tensorboard``."""

    packages = ("tensorboard",)

    def __init__(self, run_dir: Path, config: Any = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(RunDirectory(Path(run_dir)).tracker_dir("tensorboard")))

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", global_step=0)

    def log_scalars(self, phase: str, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(f"{phase}/{name}", float(value), global_step=step)

    def log_results(self, phase: str, step: int, results: Mapping[str, float]) -> None:
        self.log_scalars(phase, step, {f"eval/{name}": value for name, value in results.items()})

    def log_media(self, phase: str, step: int, samples: Sequence[MediaSample], html: str) -> None:
        lines = ["| problem | correct | mean KL | completion (token:KL) |", "|---|---|---|---|"]
        for sample in samples:
            tokens = " ".join(f"`{token!r}`:{kl:.2f}" for token, kl in zip(sample.tokens, sample.token_kl))
            lines.append(f"| {sample.problem_id} | {sample.correct} | {sample.mean_kl:.3f} | {tokens} |")
            if sample.visual_thought is not None:
                picture = np.asarray(to_pil(sample.visual_thought))  # (H, W, 3) uint8
                self.writer.add_image(
                    f"{phase}/visual_thought/{sample.problem_id}", picture, global_step=step, dataformats="HWC"
                )
        self.writer.add_text(f"{phase}/completions", "\n".join(lines), global_step=step)

    def close(self) -> None:
        self.writer.close()
