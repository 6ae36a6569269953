"""Built-in teacher updates: ``ema`` (:mod:`opsd_core.teachers.ema`) and ``frozen``
(:mod:`opsd_core.teachers.frozen`). Nothing is imported here so that the torch-free params
module can be imported alone."""
