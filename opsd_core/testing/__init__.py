"""Tools for plugin authors' test suites: contract checks, hypothesis strategies and run harnesses.

- :mod:`opsd_core.testing.divergence_contract`: generic guarantees of a Divergence.
- :mod:`opsd_core.testing.backend_contract`: equivalences every Backend must satisfy.
- :mod:`opsd_core.testing.strategies`: hypothesis strategies for logits and masks.
- :mod:`opsd_core.testing.runs`: ``opsd run`` on a config in-process, and reading the run directory.
- :mod:`opsd_core.testing.fsdp`: a multi-process (torchrun, FSDP2) run compared with the single-process one.
"""
