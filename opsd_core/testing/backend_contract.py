"""Contract checks every Backend must pass, for plugin authors' test suites.

Owns: the equivalences the trainer relies on, checked on a backend and a few problems:
KV-cached decoding gives the same logits as the full forward at every completion row;
batched sampling with fixed seeds equals sampling each row alone; batched scoring equals
scoring each row alone; N + 1 aligned rows with the sampler's mask;
preprocessed pixels given on a segment are used as is; save -> load is exact; a transformers
backend's export loads back with its own ``from_pretrained``.
Does not know: any particular model family.

Use from a plugin's tests::

    from opsd_core.testing.backend_contract import check_backend_contract

    def test_contract(tmp_path):
        check_backend_contract(MyBackend(params), problems, tmp_path)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from opsd_core.contexts.noise import with_noise_visual_thought
from opsd_core.interfaces import Backend
from opsd_core.sampling import BatchedSampler
from opsd_core.types import CompletionBatch, Context, Problem


def decode_logits(backend: Backend, model: torch.nn.Module, contexts: Sequence[Context], completions: CompletionBatch) -> torch.Tensor:
    """float32 (B, N + 1, V): the cached decoder's logits before each completion token and
    after the last one, feeding the given completions (pad after each row's end)."""
    width = completions.tokens.shape[1]
    state = backend.start_decoding(model, contexts, width + 1)
    rows = [state.logits.float()]
    for position in range(width):
        rows.append(backend.decode_step(state, completions.tokens[:, position]).float())
    return torch.stack(rows, dim=1)


@torch.no_grad()
def check_backend_contract(
    backend: Backend,
    problems: Sequence[Problem],
    tmp_path: Path,
    *,
    max_tokens: int = 12,
    atol: float = 1e-4,
    seed: int = 0,
) -> None:
    """Raise AssertionError naming the first broken guarantee."""
    model = backend.build_model().eval()
    builder = backend.context_builder()
    pairs = [builder.build(problem) for problem in problems]
    for kind, contexts in (("student", [p.student for p in pairs]), ("teacher", [p.teacher for p in pairs])):
        sampler = BatchedSampler(backend, 1.0, max_tokens)
        seeds = [seed * 1009 + 17 * row + 1 for row in range(len(contexts))]
        completions = sampler.sample(model, contexts, seeds=seeds)
        for row, context in enumerate(contexts):
            alone = sampler.sample(model, [context], seeds=seeds[row : row + 1])
            assert alone.token_lists()[0] == completions.token_lists()[row], (
                f"{kind}: row {row} sampled alone (same seed) differs from the batch"
            )
        rows = backend.completion_logits(model, contexts, completions)
        batch, width = completions.tokens.shape
        assert rows.logits.shape[:2] == (batch, width + 1), f"{kind}: logits {tuple(rows.logits.shape)}, want ({batch}, {width + 1}, V)"
        assert rows.logits.shape[2] == backend.vocabulary.size, f"{kind}: vocabulary size mismatch"
        assert torch.equal(rows.mask.cpu(), completions.row_mask().cpu()), f"{kind}: mask is not the completions' row mask"

        cached = decode_logits(backend, model, contexts, completions)
        valid = rows.mask
        difference = (cached - rows.logits.float()).abs()[valid]
        assert difference.numel() and float(difference.max()) <= atol, (
            f"{kind}: KV-cached decoding differs from the full forward by {float(difference.max()):.2e}"
        )

        for row in range(batch):
            single = CompletionBatch(
                completions.tokens[row : row + 1, : int(completions.lengths[row])],
                completions.lengths[row : row + 1],
                completions.sampled[row : row + 1, : int(completions.lengths[row])],
                completions.finished[row : row + 1],
            )
            alone = backend.completion_logits(model, [contexts[row]], single).logits[0].float()
            together = rows.logits[row, : alone.shape[0]].float()
            gap = float((alone - together).abs().max())
            assert gap <= atol, f"{kind}: row {row} scored alone differs from the batch by {gap:.2e}"

    teacher = pairs[0].teacher
    noisy = with_noise_visual_thought(teacher, backend, torch.Generator().manual_seed(seed))
    again = with_noise_visual_thought(teacher, backend, torch.Generator().manual_seed(seed))
    probe = BatchedSampler(backend, 0.0, 4).sample(model, [teacher])
    clean_rows = backend.completion_logits(model, [teacher], probe).logits
    noisy_rows = backend.completion_logits(model, [noisy], probe).logits
    again_rows = backend.completion_logits(model, [again], probe).logits
    assert torch.equal(noisy_rows, again_rows), "the same noise pixels gave different logits"
    assert not torch.allclose(clean_rows, noisy_rows), "segment pixels were ignored: noise VT changed nothing"
    assert backend.context_length(teacher) > backend.context_length(pairs[0].student), "teacher context is not longer"

    saved = tmp_path / "contract-checkpoint"
    backend.save_pretrained(model, saved)
    fresh = backend.build_model()
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.add_(1.0)
    backend.load_weights(fresh, saved)
    for (name, expected), (_, loaded) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(expected, loaded), f"save -> load changed {name}"


def check_transformers_export(backend: Backend, model_class: type, directory: Path, max_shard_bytes: int | None) -> None:
    """A backend built on transformers exports its model (capability ``export``) so that
    ``model_class.from_pretrained(directory)`` loads every tensor back, bf16-rounded, with the
    config, tokenizer and image processor files beside it and, with ``max_shard_bytes``, an index."""
    model = backend.build_model()
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    backend.export_model(model, directory, torch.bfloat16, max_shard_bytes)
    names = {path.name for path in directory.iterdir()}
    assert {"config.json", "tokenizer.json", "preprocessor_config.json"} <= names, names
    assert ("model.safetensors.index.json" in names) == (max_shard_bytes is not None), names
    loaded = model_class.from_pretrained(str(directory)).state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        if tensor.is_floating_point():
            assert loaded[name].dtype == torch.bfloat16, name
            assert torch.equal(loaded[name], tensor.to(torch.bfloat16)), name
