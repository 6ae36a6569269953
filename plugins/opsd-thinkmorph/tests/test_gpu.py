"""The thinkmorph backend on a CUDA device (``pytest -m gpu``): parity and cached decoding."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from opsd_core.testing.backend_contract import decode_logits
from opsd_core.sampling import BatchedSampler

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


def test_graph_replayed_decoding_equals_growing_steps_on_cuda():
    from test_backend import debug_backend, problems

    graphs, growing = debug_backend(device="cuda"), debug_backend(device="cuda", fixed_shape_decoding=False)
    model = graphs.build_model().eval()
    contexts = [graphs.context_builder().build(p).teacher for p in problems(3)]
    feeds = torch.randint(0, 256, (5, 3), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        a, b = graphs.start_decoding(model, contexts, 5), growing.start_decoding(model, contexts, 5)
        assert a.fixed is not None and a.fixed.graph is not None
        for feed in feeds:
            torch.testing.assert_close(graphs.decode_step(a, feed), growing.decode_step(b, feed), atol=1e-4, rtol=1e-4)
