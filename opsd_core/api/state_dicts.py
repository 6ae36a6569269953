"""The public helpers for model weights on disk as safetensors; they need torch.

Owns: the list of names a backend's ``state_dict.py`` may use: finding a directory's weight
files (one file or an index and its shards), reading them without pickle, comparing a state
dict with a model's (every missing, unexpected and wrongly shaped key in one error), loading a
checked state dict into a model, tied parameters, writing one safetensors file or shards with an index, and the
files a checkpoint directory lacks. They keep their meaning and signatures within a minor
version, like :mod:`opsd_core.api`. Use it as a namespace, ``from opsd_core.api import
state_dicts``, so its names do not clash with a backend's own ``load_into`` or
``weight_files``.
Does not know: any model family's key names, configs or tokenizers.
"""

from opsd_core.state_dicts import (
    KeyReport,
    WeightsMismatchError,
    WeightsNotFoundError,
    check_state_dict,
    compare_keys,
    load_into,
    missing_files,
    read_safetensors,
    read_weights,
    save_safetensors,
    save_sharded_safetensors,
    tied_names,
    weight_files,
)

__all__ = [
    "weight_files",
    "read_safetensors",
    "read_weights",
    "compare_keys",
    "KeyReport",
    "check_state_dict",
    "load_into",
    "tied_names",
    "save_safetensors",
    "save_sharded_safetensors",
    "missing_files",
    "WeightsNotFoundError",
    "WeightsMismatchError",
]
