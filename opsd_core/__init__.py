"""opsd: cross-modal on-policy self-distillation for unified multimodal models.

The package root imports nothing heavy; import the submodule you need.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("opsd-core")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"
