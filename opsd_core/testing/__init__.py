"""Tools for plugin authors' test suites: contract checks, hypothesis strategies and run harnesses.

- :mod:`opsd_core.testing.divergence_contract`: generic guarantees of a Divergence.
- :mod:`opsd_core.testing.backend_contract`: equivalences every Backend must satisfy.
- :mod:`opsd_core.testing.strategies`: hypothesis strategies for logits and masks.
- :mod:`opsd_core.testing.runs`: ``opsd run`` on a config in-process, and reading the run directory.
- :mod:`opsd_core.testing.fsdp`: a multi-process (torchrun, FSDP2) run compared with the single-process one.

They need pytest and hypothesis, which the ``opsd-core[test]`` extra installs; importing this
package without them says so.
"""

import importlib.util

_MISSING = [name for name in ("pytest", "hypothesis") if importlib.util.find_spec(name) is None]
if _MISSING:
    raise ImportError(
        f"opsd_core.testing needs {' and '.join(_MISSING)}, which the core does not install by "
        "default: pip install 'opsd-core[test]'"
    )
