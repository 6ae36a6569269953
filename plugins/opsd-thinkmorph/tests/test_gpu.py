"""The thinkmorph backend on a CUDA device (``pytest -m gpu``): parity and cached decoding."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from opsd_core.api.backend import BatchedSampler
from opsd_core.testing.backend_contract import decode_logits

# The CPU tests' helpers, imported by name (the suite runs in importlib mode).
sys.path.insert(0, str(Path(__file__).parent))

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def exact_matmuls():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def test_parity_on_cuda():
    from test_parity import CASES, build_model, items_of, load_file, FIXTURE, pack, forward_rows

    tensors = load_file(str(FIXTURE / "cases.safetensors"))
    for name in CASES:
        case = {key.split(".", 1)[1]: value for key, value in tensors.items() if key.startswith(name + ".")}
        model = build_model(name.startswith("gen")).cuda()
        rows = pack([items_of(case)], model.config)
        with torch.no_grad():
            hidden = forward_rows(model, rows)[0].cpu()
        torch.testing.assert_close(hidden, case["expected.last_hidden_state"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-4), ("bfloat16", 0.15)])
def test_cached_decoding_equals_full_forward_on_cuda(dtype, atol):
    from test_backend import debug_backend, problems

    backend = debug_backend(device="cuda", dtype=dtype)
    model = backend.build_model().eval()
    contexts = [backend.context_builder().build(p).teacher for p in problems(3)]
    with torch.no_grad():
        completions = BatchedSampler(backend, 1.0, 12).sample(model, contexts, torch.Generator().manual_seed(0))
        full = backend.completion_logits(model, contexts, completions)
        cached = decode_logits(backend, model, contexts, completions)
    gap = (cached - full.logits.float()).abs()[full.mask]
    assert float(gap.max()) <= atol


def _same_decode_steps(first_options: dict, second_options: dict, check, seed: int, rows: int = 3, atol=1e-4) -> None:
    """Decode the same feeds with two debug backends (options of each) on one model: equal logits."""
    from test_backend import debug_backend, problems

    first, second = debug_backend(device="cuda", **first_options), debug_backend(device="cuda", **second_options)
    model = first.build_model().eval()
    contexts = [first.context_builder().build(p).teacher for p in problems(rows)]
    feeds = torch.randint(0, 256, (5, rows), generator=torch.Generator().manual_seed(seed)).cuda()
    with torch.no_grad():
        a, b = first.start_decoding(model, contexts, 5), second.start_decoding(model, contexts, 5)
        check(a, b)
        for feed in feeds:
            torch.testing.assert_close(first.decode_step(a, feed), second.decode_step(b, feed), atol=atol, rtol=atol)


def test_graph_replayed_decoding_equals_growing_steps_on_cuda():
    def check(graphs, growing):
        assert graphs.fixed is not None and graphs.fixed.graph is not None and growing.fixed is None

    _same_decode_steps({}, {"fixed_shape_decoding": False}, check, seed=1)


def test_compiled_decode_steps_equal_eager_ones_on_cuda():
    def check(compiled, eager):
        assert compiled.fixed.compiled and not eager.fixed.compiled

    _same_decode_steps({}, {"compile_decoding": False}, check, seed=2)
    _same_decode_steps({}, {"compile_decoding": False}, check, seed=2, rows=1)


@pytest.mark.parametrize("compile", [True, False])
@pytest.mark.parametrize("dtype,atol", [("float32", 1e-4), ("bfloat16", 0.1)])
def test_one_row_kernels_decode_like_the_layer_on_cuda(compile, dtype, atol):
    from opsd_thinkmorph.model import call_layer

    def check(kernels, layer):
        assert kernels.fixed.run_layer is not layer.fixed.run_layer
        if not compile:
            assert layer.fixed.run_layer is call_layer

    options = {"compile_decoding": compile, "dtype": dtype}
    _same_decode_steps(options, {**options, "decode_kernels": False}, check, seed=4, rows=1, atol=atol)


def test_batched_sampling_with_fixed_seeds_equals_each_row_alone_on_cuda():
    from test_backend import debug_backend, problems

    backend = debug_backend(device="cuda")
    model = backend.build_model().eval()
    contexts = [backend.context_builder().build(p).student for p in problems(3)]
    sampler = BatchedSampler(backend, 1.0, 24)
    together = sampler.sample(model, contexts, seeds=[5, 6, 7])
    for row in range(3):
        assert sampler.sample(model, contexts[row : row + 1], seeds=[5 + row]).token_lists()[0] == together.token_lists()[row]


@pytest.mark.parametrize("compile", [True, False])
def test_kept_graphs_answer_exactly_as_new_ones_on_cuda(compile):
    """Captured decoders replayed for later answers give the logits of a decoder captured per
    answer, bit for bit, before and after an in-place weight update."""
    from test_backend import debug_backend
    from test_decoder_reuse import questions

    kept, new = debug_backend(device="cuda", compile_decoding=compile), debug_backend(device="cuda", kept_decoders=0, compile_decoding=compile)
    model = kept.build_model().eval()
    for rows in (1, 3):
        completions = BatchedSampler(new, 1.0, 6, max_image_skips=0).sample(model, questions(rows), seeds=list(range(rows)))
        for offset in range(3):
            if offset == 2:
                with torch.no_grad():
                    model.language_model.lm_head.weight.mul_(1.5)
            with torch.no_grad():
                contexts = questions(rows, offset)
                reused = decode_logits(kept, model, contexts, completions)
                assert torch.equal(reused, decode_logits(new, model, contexts, completions))
    assert kept.decoders.builds == 2
