"""Export: a trained model of a checkpoint, written in its family's released layout (``opsd export``).

Owns: checking the request before anything is written (a checkpoint whose manifest verifies, a
known model and dtype, an output directory that is absent or empty, a backend that declares
``export``), finding the run config of a checkpoint, building the model on the CPU with the
checkpoint's weights (a LoRA run's adapters merged into the start model; otherwise through
:func:`~opsd_core.trainer.checkpoint.read_model_state`, whatever the checkpoint's format), and writing through a temporary directory renamed into place at the
end, so that a failure leaves nothing behind.
Does not know: any family's layout (the backend's ``export_model`` writes it) or how
checkpoints are written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from opsd_core import lora
from opsd_core.components import build_backend
from opsd_core.config import load_config, lora_settings
from opsd_core.errors import CapabilityError, ConfigError
from opsd_core.rundir import CONFIG
from opsd_core.state_dicts import load_into
from opsd_core.trainer.checkpoint import MODELS, START_RECORD, load_model, read_model_state, verify_checkpoint

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    model: str = "student",
    dtype: str = "bf16",
    max_shard_bytes: int | None = None,
    config_path: Path | None = None,
    overrides: tuple[str, ...] = (),
) -> list[Path]:
    """Write checkpoint ``checkpoint``'s ``model`` into the new directory ``out`` in the layout
    of its family's released checkpoints; returns the files written.

    Args:
        checkpoint: a ``step-NNNNNNN`` directory of a run.
        out: the directory to create (it may exist if empty).
        model: ``student`` or ``teacher`` (the EMA teacher, for a run with one).
        dtype: ``bf16`` (as released) or ``fp32``, the dtype of every floating-point tensor.
        max_shard_bytes: weights above this size are split into shards with an index (None:
            the family's default).
        config_path: the run config; default the ``config.toml`` of the run directory that
            holds ``checkpoint`` (``RUN/<phase>/checkpoints/step-NNNNNNN``).
        overrides: ``section.field=value`` changes to that config (as ``--set``), e.g. a
            setting of the backend this machine cannot serve.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if model not in MODELS:
        raise ConfigError(f"--model: unknown model {model!r}; use one of {', '.join(MODELS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ConfigError(f"--max-shard-size: must be at least 1 byte (got {max_shard_bytes})")
    _check_output(out)
    verify_checkpoint(checkpoint)
    # Export runs on the CPU whatever device the run trained on (a GPU run exports anywhere).
    config = load_config(_run_config(checkpoint, config_path), [*overrides, "run.device='cpu'"])
    backend = build_backend(config)
    if not backend.capabilities.export:
        raise CapabilityError(
            f"backend {type(backend).__name__} cannot export a model in its family's released layout "
            "(capability export); the checkpoint's student/ and teacher/ directories load with the backend itself"
        )
    adapters = lora_settings(config)
    if (checkpoint / START_RECORD).is_file() or (adapters is not None and (checkpoint / model / lora.ADAPTERS_FILE).is_file()):
        # Trainable tensors or LoRA adapters only: they go over (are merged into) the start
        # model, whose hash the checkpoint records; the export is a complete model.
        module = backend.build_model()
        load_model(backend, module, checkpoint, model, adapters)
    else:
        module = _model_on_cpu(backend)
        load_into(module, read_model_state(checkpoint, model), checkpoint / model)
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        backend.export_model(module, staging, DTYPES[dtype], max_shard_bytes)
        if out.is_dir():
            out.rmdir()  # empty: checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(path for path in out.rglob("*") if path.is_file())


def _check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {str(out)!r} is a file; give a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out: {str(out)!r} is not empty; give a new or empty directory (nothing was written)")
    if not out.parent.is_dir():
        raise ConfigError(f"--out: the parent directory {str(out.parent)!r} does not exist; create it first")


def _run_config(checkpoint: Path, config_path: Path | None) -> Path:
    """The config a checkpoint was trained with: ``config_path``, else its run's ``config.toml``."""
    if config_path is not None:
        return Path(config_path)
    run = checkpoint.resolve().parents[2] if len(checkpoint.resolve().parents) > 2 else checkpoint
    if not (run / CONFIG).is_file():
        raise ConfigError(
            f"no {CONFIG} found for checkpoint {str(checkpoint)!r} (looked in {str(run)!r}, the run directory of "
            f"RUN/<phase>/checkpoints/step-NNNNNNN); pass the run's config with --config"
        )
    return run / CONFIG


def _model_on_cpu(backend) -> torch.nn.Module:
    """The backend's model on the CPU, ready to receive a state dict: its meta-device skeleton
    given memory (no weights loaded or drawn twice) where it has one, else :meth:`build_model`."""
    if backend.capabilities.meta_skeleton:
        return backend.model_skeleton().to_empty(device="cpu")
    return backend.build_model().to("cpu")
