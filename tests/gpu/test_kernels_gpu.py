"""opsd_core.kernels on CUDA (``pytest -m gpu``): the one-row linear kernels and one-query
attention against float64 sums, at least as accurate as the library path (cuBLAS or torch
attention plus the same roundings), for shapes that the kernel blocks divide and shapes they do
not, inside CUDA graphs and torch.compile too."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from opsd_core.kernels import attention, gemv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

SHAPES = [  # (input width, stacked output sizes)
    (3584, [3584, 512, 512]),  # q, k, v of the 7B
    (200, [100, 20, 20]),  # no block divides the width
    (18944, [64]),  # long rows (the down projection's blocks)
    (96, [37]),  # an output size no block divides
]


def _inputs(width, lengths, dtype, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, device="cuda", generator=generator)
    x = draw(width).to(dtype)
    weights = [(draw(n, width) / width**0.5).to(dtype) for n in lengths]
    biases = [draw(n).to(dtype) for n in lengths]
    residual = draw(sum(lengths)).to(dtype)
    return x, weights, biases, residual


def _assert_as_accurate(ours, library, exact, relative):
    """float32: within ``relative`` of the largest exact value; lower precisions: no further from
    the float64 result than the library path (plus half)."""
    ours_error = (ours.double() - exact).abs().max().item()
    if ours.dtype == torch.float32:
        assert ours_error <= relative * exact.abs().max().item()
    else:
        library_error = (library.double() - exact).abs().max().item()
        assert ours_error <= 1.5 * library_error + 1e-6, (ours_error, library_error)


@pytest.mark.parametrize("width,lengths", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_is_as_accurate_as_the_library_path(width, lengths, dtype):
    x, weights, biases, residual = _inputs(width, lengths, dtype)
    assert gemv.available(x)
    with torch.no_grad():
        ours = gemv.linear(x, weights, biases, residual)
        library = residual + torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)])
    exact = residual.double() + torch.cat([w.double() @ x.double() + b.double() for w, b in zip(weights, biases)])
    assert ours.dtype == dtype and ours.shape == (sum(lengths),)
    _assert_as_accurate(ours, library, exact, relative=1e-5)


@pytest.mark.parametrize("width,n", [(3584, 18944), (200, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_is_as_accurate_as_the_library_path(width, n, dtype):
    x, (gate, up), _, _ = _inputs(width, [n, n], dtype, seed=1)
    with torch.no_grad():
        ours = gemv.swiglu(x, gate, up)
        library = F.silu(F.linear(x, gate)) * F.linear(x, up)
    exact = F.silu(gate.double() @ x.double()) * (up.double() @ x.double())
    _assert_as_accurate(ours, library, exact, relative=1e-5)


def test_kernels_replay_in_cuda_graphs_and_compile():
    x, weights, biases, residual = _inputs(512, [256, 64, 64], torch.bfloat16, seed=2)

    def step(row):
        qkv = gemv.linear(row, weights, biases, residual)
        return gemv.swiglu(qkv[:256], weights[0][:, :256], weights[0][:, 256:])

    compiled = torch.compile(step, fullgraph=True)
    static = x.clone()
    with torch.no_grad():
        for fn in (step, compiled):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn(static)
            for seed in range(3):
                fresh = torch.randn(512, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
                static.copy_(fresh.to(static.dtype))
                graph.replay()
                torch.testing.assert_close(out, step(static), atol=0, rtol=0)


@pytest.mark.parametrize(
    "heads,kv_heads,keys,width",
    [(28, 4, 1608, 128), (28, 4, 5000, 128), (4, 2, 70, 16), (8, 8, 1, 64)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_is_as_accurate_as_the_library_path(heads, kv_heads, keys, width, dtype):
    generator = torch.Generator(device="cuda").manual_seed(keys)
    draw = lambda *shape: torch.randn(*shape, device="cuda", generator=generator)
    q, k, v = draw(heads, width).to(dtype), (2 * draw(kv_heads, keys, width)).to(dtype), draw(kv_heads, keys, width).to(dtype)
    valid = torch.rand(keys, device="cuda", generator=generator) > 0.3
    valid[: keys // 2] = False  # whole chunks without a key that counts
    valid[-1] = True
    assert attention.available(q)
    with torch.no_grad():
        ours = attention.one_query_attention(q, k, v, valid)
    library = attention.torch_attention(q, k, v, valid)
    group = heads // kv_heads
    scores = torch.einsum("hd,hsd->hs", q.double(), k.double().repeat_interleave(group, 0)) / width**0.5
    exact = torch.einsum("hs,hsd->hd", scores.masked_fill(~valid, float("-inf")).softmax(-1), v.double().repeat_interleave(group, 0))
    assert ours.dtype == dtype and ours.shape == (heads, width)
    _assert_as_accurate(ours, library, exact, relative=1e-5)
