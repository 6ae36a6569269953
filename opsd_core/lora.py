"""LoRA adapters on a backend's model, through ``peft``: the one place that knows them.

Owns: checking ``[backend.lora]`` against a built model (every target names a module, none
sits where the backend reads weights without calling the module), attaching the adapters
(``peft.inject_adapter_in_model``: each targeted layer gains A (r, in) and B (out, r), scaled
by alpha / r; B starts at zero, so a fresh adapter leaves the model's outputs unchanged; every
other parameter is frozen), the adapter tensors a checkpoint holds, and merging them into the
base weights (:func:`merged_state_dict` for export, :func:`merge_adapters` in place).
Does not know: any model family (modules are matched by name), the trainer, or the checkpoint
directory layout beyond the one adapter file it reads and writes. ``peft`` is imported only
when a run uses LoRA (``pip install 'opsd-core[lora]'``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn

from opsd_core.config.sections import LoraSection
from opsd_core.errors import CheckpointError, ConfigError

ADAPTERS_FILE = "adapters.safetensors"
ADAPTER_NAME = "default"
# Layer types peft's LoRA wraps.
_ADAPTABLE = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ConfigError(
            "backend.lora needs the peft package, which is not installed; install it with "
            "`pip install 'opsd-core[lora]'` or remove [backend.lora]"
        ) from error
    return peft


def targeted_modules(model: nn.Module, lora: LoraSection) -> dict[str, list[str]]:
    """Each target of ``lora.target_modules`` -> the names of the layers it adapts.

    Raises:
        ConfigError: a target matches no layer peft can adapt (Linear, Embedding, Conv); the
            message names the target and layer names that exist.
    """
    adaptable = [name for name, module in model.named_modules() if isinstance(module, _ADAPTABLE)]
    matched = {target: [name for name in adaptable if LoraSection.matches(name, target)] for target in lora.target_modules}
    for target, names in matched.items():
        if not names:
            leaves = sorted({_short_name(name) for name in adaptable})
            shown = ", ".join(repr(leaf) for leaf in leaves[:12]) + (", ..." if len(leaves) > 12 else "")
            raise ConfigError(
                f"backend.lora.target_modules: {target!r} matches no Linear, Embedding or Conv layer of the "
                f"model (got {list(lora.target_modules)}); name layers by their full name, last parts or a "
                f"pattern with *, e.g. {shown}"
            )
    return matched


def _short_name(name: str) -> str:
    """The last part of a module name that names it as a target: ``blocks.0.mlp.2`` -> ``mlp.2``."""
    parts = name.split(".")
    short = parts[-1:]
    while short[0].isdigit() and len(short) < len(parts):
        short = parts[-len(short) - 1 :]
    return ".".join(short)


def check_adapters(model: nn.Module, lora: LoraSection, direct_reads: Sequence[tuple[str, str]]) -> None:
    """Refuse ``lora`` on ``model`` when a target matches nothing, or adapts a layer whose weight
    is read without calling the layer (``direct_reads``: (module-name pattern, the setting that
    reads it) pairs; an adapter there would be skipped), in one message naming both settings."""
    conflicts = []
    for target, names in targeted_modules(model, lora).items():
        for pattern, setting in direct_reads:
            hit = next((name for name in names if fnmatch(name, pattern)), None)
            if hit is not None:
                conflicts.append(
                    f"backend.lora.target_modules: {target!r} adapts {hit!r}, whose weight {setting} reads "
                    f"directly (the adapter would be skipped there); drop {target!r} from target_modules or "
                    f"turn off {setting}"
                )
                break
    if conflicts:
        raise ConfigError("; ".join(conflicts))


def base_sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose modules are new and whose parameters are ``model``'s own tensors:
    adapters attached to the copy leave ``model`` as it was, and no base weight is duplicated."""
    return copy.deepcopy(model, memo={id(parameter): parameter for parameter in model.parameters()})


def attach_adapters(model: nn.Module, lora: LoraSection, seed: int) -> nn.Module:
    """Add LoRA adapters to ``model`` in place and freeze every other parameter; returns it.

    The A matrices are drawn from a generator seeded with ``seed`` (the global random state is
    left as it was), so every phase of a run starts from the same adapters.
    """
    peft = _peft()
    names = sorted({name for matched in targeted_modules(model, lora).values() for name in matched})
    config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=names,  # full names: peft adapts exactly the layers matched here
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(_is_adapter(name))
    return model


def _is_adapter(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters."""
    return any(_is_adapter(name) for name, _ in model.named_parameters())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` by parameter name (e.g. ``blocks.0.qkv.lora_A.default.weight``)."""
    return {name: parameter.detach() for name, parameter in model.named_parameters() if _is_adapter(name)}


def save_adapters(model: nn.Module, directory: Path) -> None:
    """Write the adapter tensors of ``model`` to ``directory/adapters.safetensors``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.contiguous().cpu() for name, tensor in adapter_state_dict(model).items()}
    save_file(tensors, str(directory / ADAPTERS_FILE))


def load_adapters(model: nn.Module, directory: Path) -> None:
    """Copy the tensors of ``directory/adapters.safetensors`` into the adapters of ``model``.

    Raises:
        CheckpointError: the file is missing or holds other adapters than the model has.
    """
    from safetensors.torch import load_file

    path = directory / ADAPTERS_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} holds no {ADAPTERS_FILE}: a LoRA checkpoint directory has the adapter tensors there "
            "(written by a run with [backend.lora])"
        )
    saved = load_file(str(path))
    parameters = {name: parameter for name, parameter in model.named_parameters() if _is_adapter(name)}
    if saved.keys() != parameters.keys():
        differing = sorted(saved.keys() ^ parameters.keys())[:3]
        raise CheckpointError(
            f"{path} holds other adapters than [backend.lora] gives the model (e.g. {differing}); resume with "
            "the [backend.lora] the checkpoint was written with"
        )
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(saved[name])


def load_merged(model: nn.Module, lora: LoraSection, directory: Path) -> nn.Module:
    """``model`` (the start model, as the backend builds it) with the adapters saved in
    ``directory`` (a LoRA checkpoint's ``student/`` or ``teacher/``) attached, loaded and merged
    in place: the trained model, with the plain model's modules and names; returns it."""
    attach_adapters(model, lora, seed=0)  # every adapter tensor is overwritten by the saved one
    load_adapters(model, directory)
    return merge_adapters(model)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of ``model`` with its adapters merged, under the names the model has
    without adapters (``q_proj.base_layer.weight`` -> ``q_proj.weight``; adapter tensors dropped):
    what a backend's ``load_weights`` layout expects. ``model`` is left unchanged; each merged
    weight is ``W + (alpha / r) B A`` in ``W``'s dtype. A model without adapters gives its own
    state dict."""
    layers = _lora_layers(model) if has_adapters(model) else {}
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if _is_adapter(name):
                continue
            layer_name, _, rest = name.rpartition(".base_layer.")
            if not layer_name or layer_name not in layers:
                merged[name] = tensor
                continue
            key = f"{layer_name}.{rest}"
            if rest == "weight":
                delta = layers[layer_name].get_delta_weight(ADAPTER_NAME)
                tensor = (tensor.float() + delta.float()).to(tensor.dtype)
            merged[key] = tensor
    return merged


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge the adapters of ``model`` into its base weights in place and put each adapted
    layer's base layer back where the adapter layer was; returns ``model`` (now without peft
    layers: the same module names and tensors as a model that never had adapters)."""
    for name, layer in _lora_layers(model).items():
        layer.merge(adapter_names=[ADAPTER_NAME])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return model
