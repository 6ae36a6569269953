"""An example third-party opsd backend plugin: the ``byte-umm`` backend.

Owns: nothing at import time; ``plugin`` registers, ``config`` validates, ``vocab`` names the
tokens, ``model`` computes, ``backend`` adapts the model to opsd's Backend role, ``context``
holds the prompt texts.
Does not know: opsd_core's internals; it imports only the public API (``opsd_core.api``: the
hook marker, PluginParams, the Backend and PrivilegedContextBuilder roles, the data types and
errors; ``opsd_core.testing`` in its tests).
"""
