"""The janus-pro backend on its debug flavour: the backend contract, visual thoughts,
checkpoints in the Hugging Face layout, config refusals and FSDP2 in one process."""

from __future__ import annotations

from types import SimpleNamespace

from pathlib import Path

import pytest
import torch
from opsd_janus.backend import JanusBackend
from opsd_janus.config import JanusParams
from pydantic import ValidationError

from opsd_core.api import Problem
from opsd_core.api.backend import BatchedSampler
from opsd_core.testing.backend_contract import check_backend_contract, check_transformers_export


EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

def debug_backend(**overrides) -> JanusBackend:
    return JanusBackend(JanusParams(flavour="debug", **{"image_size": 32, **overrides}))


@pytest.fixture(scope="module")
def backend() -> JanusBackend:
    return debug_backend()


@pytest.fixture(scope="module")
def model(backend):
    return backend.build_model().eval()


def problems(count: int = 3) -> list[Problem]:
    generator = torch.Generator().manual_seed(0)
    sides = [(20, 32), (48, 24), (32, 32)]
    return [
        Problem(
            id=f"p{i}",
            image=torch.rand(3, *sides[i % 3], generator=generator),
            question="which way to the goal?" + " really?" * i,
            visual_thought=torch.rand(3, 32, 32, generator=generator),
        )
        for i in range(count)
    ]


def test_backend_contract(backend, tmp_path):
    check_backend_contract(backend, problems(), tmp_path, max_tokens=8)


def test_images_are_rendered_as_the_processor_expands_them(backend):
    context = backend.context_builder().build(problems(1)[0]).teacher
    tokens = backend.render(context).tokens
    ids = backend.vocabulary.special
    assert tokens.count(ids["image_token"]) == 2 * 16
    assert tokens.count(ids["image_start"]) == tokens.count(ids["image_end"]) == 2
    start = tokens.index(ids["image_start"])
    assert tokens[start + 1 : start + 17] == [ids["image_token"]] * 16 and tokens[start + 17] == ids["image_end"]
    assert backend.decode(tokens).endswith("<|Assistant|>:")


def test_a_sampled_placeholder_token_is_scored_as_text(backend, model):
    contexts = [backend.context_builder().build(p).student for p in problems(2)]
    placeholder = backend.vocabulary.special["image_token"]
    completions = BatchedSampler(backend, 1.0, 4).sample(model, contexts, torch.Generator().manual_seed(0))
    tokens = completions.tokens.clone()
    tokens[:, 0] = placeholder
    forced = type(completions)(tokens, completions.lengths.clamp(min=1), completions.sampled, completions.finished)
    rows = backend.completion_logits(model, contexts, forced)
    assert torch.isfinite(rows.logits).all()


def test_visual_thoughts_are_images_of_the_configured_size_and_seeded(backend, model):
    batch = problems(3)
    images = backend.generate_visual_thought(model, batch, torch.Generator().manual_seed(0))
    assert [image.size for image in images] == [(32, 32)] * 3
    assert all(image.mode == "RGB" for image in images)
    again = backend.generate_visual_thought(model, batch, torch.Generator().manual_seed(0))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(images, again))
    other = backend.generate_visual_thought(model, batch, torch.Generator().manual_seed(1))
    assert any(a.tobytes() != b.tobytes() for a, b in zip(images, other))


def test_a_greedy_visual_thought_drawn_in_a_batch_equals_it_drawn_alone():
    greedy = debug_backend(vt_temperature=0.0)
    model = greedy.build_model().eval()
    batch = problems(3)
    together = greedy.generate_visual_thought(model, batch)
    alone = [greedy.generate_visual_thought(model, [problem])[0] for problem in batch]
    assert [a.tobytes() for a in together] == [a.tobytes() for a in alone]


def test_saved_checkpoint_loads_alone_in_the_hugging_face_layout(backend, model, tmp_path):
    backend.save_pretrained(model, tmp_path / "ckpt")
    names = {path.name for path in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= names
    reloaded_backend = JanusBackend(JanusParams(checkpoint=str(tmp_path / "ckpt"), image_size=32))
    reloaded = reloaded_backend.build_model()
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert reloaded_backend.vocabulary == backend.vocabulary
    assert reloaded_backend.encode("move left <|User|>") == backend.encode("move left <|User|>")


def test_transformers_loads_the_saved_checkpoint(backend, model, tmp_path):
    from transformers import JanusForConditionalGeneration

    backend.save_pretrained(model, tmp_path / "ckpt")
    loaded = JanusForConditionalGeneration.from_pretrained(str(tmp_path / "ckpt"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_random_flavour_is_seeded():
    first, second, other = debug_backend().build_model(), debug_backend().build_model(), debug_backend(seed=1).build_model()
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_unsupported_settings_are_refused_before_running(tmp_path):
    with pytest.raises(ValidationError, match="checkpoint is required"):
        JanusParams()
    with pytest.raises(ValidationError, match="square number"):
        JanusParams(flavour="debug", image_size=32, image_tokens=15)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        debug_backend(max_context_tokens=100_000)
    with pytest.raises(FileNotFoundError, match="config.json"):
        JanusBackend(JanusParams(checkpoint=str(tmp_path)))
    backend = debug_backend()
    backend.save_pretrained(backend.build_model(), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="set image_size = 32"):
        JanusBackend(JanusParams(checkpoint=str(tmp_path / "ckpt"), image_size=384))


def test_too_long_a_context_is_a_clear_error(model):
    short = debug_backend(max_context_tokens=64)
    context = short.context_builder().build(problems(1)[0]).student
    with pytest.raises(ValueError, match="max_context_tokens"):
        short.start_decoding(model, [context], 8)


def test_fsdp_in_one_process_gives_the_unsharded_logits_and_gradients(backend):
    from opsd_core.testing.fsdp import one_process_group

    with one_process_group() as mesh:
        reference, sharded = backend.build_model(), backend.build_model()
        config = SimpleNamespace(run=SimpleNamespace(precision="fp32"), train=SimpleNamespace(activation_checkpointing=True))
        backend.parallelize(sharded, mesh, config)
        contexts = [backend.context_builder().build(p).teacher for p in problems(2)]
        completions = BatchedSampler(backend, 1.0, 6).sample(reference, contexts, torch.Generator().manual_seed(0))
        losses = []
        for net in (reference, sharded):
            rows = backend.completion_logits(net, contexts, completions)
            loss = rows.logits[rows.mask].float().logsumexp(-1).mean()
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1])
        grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        for name, parameter in sharded.named_parameters():
            if name in grads:
                torch.testing.assert_close(parameter.grad.full_tensor(), grads[name], atol=1e-6, rtol=1e-5)
        images = backend.generate_visual_thought(sharded, problems(1), torch.Generator().manual_seed(0))
        assert images[0].size == (32, 32)


def test_a_forward_cap_beyond_the_positions_is_refused_when_the_run_starts(backend):
    from opsd_core.api import ConfigError, load_config

    config = load_config(EXAMPLES / "janus-pro-debug.toml", ["sampling.max_forward_tokens=5000"])
    with pytest.raises(ConfigError, match="sampling.max_forward_tokens = 5000"):
        backend.check_run(config)
    backend.check_run(load_config(EXAMPLES / "janus-pro-debug.toml"))


@pytest.mark.parametrize("max_shard_bytes", [None, 200_000])
def test_the_export_loads_with_transformers_in_bf16(backend, tmp_path, max_shard_bytes):
    from transformers import JanusForConditionalGeneration

    check_transformers_export(backend, JanusForConditionalGeneration, tmp_path, max_shard_bytes)
