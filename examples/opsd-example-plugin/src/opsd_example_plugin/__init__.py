"""An example third-party opsd plugin: the ``total-variation`` divergence.

Owns: nothing at import time; ``plugin`` registers, ``config`` validates, ``divergence``
computes.
Does not know: opsd_core's internals; it uses only the public API (hooks, PluginParams,
the Divergence role, opsd_core.testing).
"""
