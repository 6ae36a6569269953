"""Tools for plugin authors' test suites: contract checks and hypothesis strategies.

- :mod:`opsd_core.testing.divergence_contract`: generic guarantees of a Divergence.
- :mod:`opsd_core.testing.backend_contract`: equivalences every Backend must satisfy.
- :mod:`opsd_core.testing.strategies`: hypothesis strategies for logits and masks.
"""
