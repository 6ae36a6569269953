"""opsd_core.kernels on CPU: the torch path of the one-row ops and of one-query attention (the
Triton kernels are checked on GPUs in tests/gpu/test_kernels_gpu.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opsd_core.kernels import attention, gemv


def _inputs(lengths, width=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)
    weights = [draw(n, width) for n in lengths]
    biases = [draw(n) for n in lengths]
    return draw(width), weights, biases, draw(sum(lengths))


@pytest.mark.parametrize("lengths", [[8], [8, 4], [12, 4, 4]])
def test_linear_stacks_projections_and_adds_the_residual(lengths):
    x, weights, biases, residual = _inputs(lengths)
    expected = residual + torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)])
    torch.testing.assert_close(gemv.linear(x.view(1, 1, -1), weights, biases, residual), expected, atol=1e-12, rtol=1e-12)
    plain = torch.cat([x @ w.T for w in weights])
    torch.testing.assert_close(gemv.linear(x, weights), plain, atol=1e-12, rtol=1e-12)


def test_swiglu_is_silu_of_gate_times_up():
    x, (gate, up), _, _ = _inputs([8, 8])
    torch.testing.assert_close(gemv.swiglu(x.view(1, -1), gate, up), F.silu(x @ gate.T) * (x @ up.T))


def test_linear_refuses_bad_arguments():
    x, weights, biases, residual = _inputs([4, 4, 4, 4])
    with pytest.raises(ValueError, match="one to three stacked weights, got 4"):
        gemv.linear(x, weights)
    with pytest.raises(ValueError, match="one bias per weight: got 1 biases for 2 weights"):
        gemv.linear(x, weights[:2], biases[:1])
    with pytest.raises(ValueError, match=r"weight 1 must be \(N, 24\) for an input row of 24, got \(4, 23\)"):
        gemv.linear(x, [weights[0], weights[1][:, :23]])
    with pytest.raises(ValueError, match="weight 0 is torch.float32 but the input is torch.float64"):
        gemv.linear(x, [weights[0].float()])
    with pytest.raises(ValueError, match=r"bias 1 must have shape \(4,\), got \(3,\)"):
        gemv.linear(x, weights[:2], [biases[0], biases[1][:3]])
    with pytest.raises(ValueError, match=r"residual must have shape \(8,\), one entry per output, got \(16,\)"):
        gemv.linear(x, weights[:2], residual=residual)
    with pytest.raises(ValueError, match="gate and up must have one shape"):
        gemv.swiglu(x, weights[0], torch.cat(weights[:2]))


@pytest.mark.slow  # inductor compiles C++ on a CPU: most of a minute on 2 busy cores
def test_ops_compile_whole():
    x, weights, biases, residual = _inputs([8, 4])

    def step(row):
        return gemv.swiglu(gemv.linear(row, weights, biases, residual), weights[0][:, :12], weights[0][:, 12:]) * 2

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(x), step(x))


def test_kernels_are_for_cuda_and_refuse_gradients():
    x, weights, _, _ = _inputs([4])
    assert not gemv.available(x) and not attention.available(x.view(1, -1))
    weight = weights[0].requires_grad_()
    with pytest.raises(RuntimeError, match=r"no backward: call them under torch.no_grad\(\)"):
        gemv.linear(x, [weight])
    with torch.no_grad():
        gemv.linear(x, [weight])
    q = torch.randn(2, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="one_query_attention has no backward"):
        attention.one_query_attention(q, torch.randn(1, 3, 16), torch.randn(1, 3, 16), torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4), (7, 1)])
def test_one_query_attention_is_softmax_attention_over_valid_keys(heads, kv_heads):
    generator = torch.Generator().manual_seed(heads)
    q = torch.randn(heads, 16, generator=generator, dtype=torch.float64)
    keys, values = torch.randn(2, kv_heads, 30, 16, generator=generator, dtype=torch.float64)
    valid = torch.rand(30, generator=generator) > 0.4
    valid[0] = True
    group = heads // kv_heads
    expected = torch.stack(
        [
            torch.softmax(keys[h // group][valid] @ q[h] / 4.0, dim=0) @ values[h // group][valid]
            for h in range(heads)
        ]
    )
    torch.testing.assert_close(attention.one_query_attention(q, keys, values, valid), expected)
    assert not attention.available(q)


def test_one_query_attention_refuses_inputs_that_do_not_fit():
    keys, valid = torch.randn(4, 3, 16), torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of KV heads \(4\)"):
        attention.one_query_attention(torch.randn(6, 16), keys, keys, valid)
    with pytest.raises(ValueError, match=r"keys \(4, 3, 16\), values \(4, 3, 8\)"):
        attention.one_query_attention(torch.randn(8, 16), keys, torch.randn(4, 3, 8), valid)
    with pytest.raises(ValueError, match=r"valid must be bool \(3,\), one flag per key"):
        attention.one_query_attention(torch.randn(8, 16), keys, keys, torch.ones(4, dtype=torch.bool))
