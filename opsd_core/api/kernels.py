"""The public decode-step GPU kernels a backend's model code may call; they need torch.

Owns: the list of kernel entry points: one-row matrix-vector products (up to three stacked
weights, an optional residual) and the fused SwiGLU of one row, and attention of one query
position over a KV cache. Each runs Triton kernels on CUDA and plain torch elsewhere, and
none has a backward (call them under ``torch.no_grad()``). They keep their meaning and
signatures within a minor version, like :mod:`opsd_core.api`.
Does not know: models, caches or RoPE.
"""

from opsd_core.kernels.attention import one_query_attention
from opsd_core.kernels.gemv import linear as row_linear
from opsd_core.kernels.gemv import swiglu as row_swiglu

__all__ = ["row_linear", "row_swiglu", "one_query_attention"]
