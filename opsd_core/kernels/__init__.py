"""GPU kernels that backends may call from their own model code (see :mod:`opsd_core.kernels.gemv`)."""
