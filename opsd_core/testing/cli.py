"""The ``opsd`` command line and the plugins it loads, for plugins' tests that drive them as a
user would.

Owns: the list of names such tests use: ``cli``, the click group (pass it to
``click.testing.CliRunner().invoke``); ``main``, the console script's function (for a
subprocess: ``python -c "from opsd_core.testing.cli import main; main()" ARGS``); and the
plugin manager and registries as ``OPSD_LOAD_PLUGINS`` selects them (to check that a plugin's
entry point registers what it should).
Does not know: any plugin. Importing it imports no torch.
"""

from opsd_core.cli import cli, main
from opsd_core.plugins import build_plugin_manager, fill_registries

__all__ = ["cli", "main", "build_plugin_manager", "fill_registries"]
