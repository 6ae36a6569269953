"""An example third-party opsd backend plugin: the ``byte-umm`` backend.

Owns: nothing at import time; ``plugin`` registers, ``config`` validates, ``vocab`` names the
tokens, ``model`` computes, ``backend`` adapts the model to opsd's Backend role, ``context``
holds the prompt texts.
Does not know: opsd_core's internals; it uses only the public API (hooks, PluginParams, the
Backend and PrivilegedContextBuilder roles, opsd_core.testing).
"""
