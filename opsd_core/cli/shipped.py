"""The run configs installed with opsd-core, and which one a command uses by default.

Owns: where the shipped configs are (``opsd_core/examples``, the repository's ``examples/``),
preferring a user's edited copy in ``./examples/``, and the embedded default's name.
Does not know: what a config holds; torch (the light commands list configs).
"""

from __future__ import annotations

from pathlib import Path

from opsd_core.errors import ConfigError

DEFAULT_CONFIG = Path("examples") / "quickstart.toml"
SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "examples"
"""The run configs installed with opsd-core (``opsd examples`` lists and copies them)."""


def shipped_config(name: str) -> Path | None:
    """``examples/<name>.toml`` in the working directory (a copy the user edits), else the one
    installed with opsd-core; None when neither exists."""
    for candidate in (Path.cwd() / "examples" / f"{name}.toml", SHIPPED_CONFIGS / f"{name}.toml"):
        if candidate.is_file():
            return candidate
    return None


def shipped_config_names() -> list[str]:
    return sorted(path.stem for path in SHIPPED_CONFIGS.glob("*.toml"))


def default_config_path() -> Path:
    """The embedded default's config, ``quickstart.toml`` (see :func:`shipped_config`)."""
    found = shipped_config(DEFAULT_CONFIG.stem)
    if found is None:
        raise ConfigError(f"no CONFIG given and {DEFAULT_CONFIG} not found; pass a run config file")
    return found


def backend_config_path(backend: str) -> Path:
    """A backend's shipped run config ``<backend>.toml`` (see :func:`shipped_config`)."""
    found = shipped_config(backend)
    if found is None:
        raise ConfigError(
            f"--backend {backend}: no examples/{backend}.toml found; pass a CONFIG for it (shipped configs: "
            f"{', '.join(shipped_config_names()) or 'none'}; `opsd examples` lists them)"
        )
    return found


