"""An example third-party opsd plugin: the ``total-variation`` divergence.

Owns: nothing at import time; ``plugin`` registers, ``config`` validates, ``divergence``
computes.
Does not know: opsd_core's internals; it imports only the public API (``opsd_core.api``: the
hook marker, PluginParams, the Divergence role; ``opsd_core.testing`` in its tests).
"""
