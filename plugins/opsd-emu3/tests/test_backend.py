"""The emu3 backend on its debug flavour: the backend contract, visual thoughts, checkpoints, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opsd_core.api import CapabilityError, ConfigError, Problem
from opsd_core.testing.backend_contract import check_backend_contract, check_transformers_export
from opsd_emu3.backend import Emu3Backend
from opsd_emu3.config import Emu3Params

SMALL = dict(image_min_pixels=16 * 16, image_max_pixels=32 * 32, vt_grid=(4, 4), vt_top_k=0)


EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

def debug_backend(**overrides) -> Emu3Backend:
    return Emu3Backend(Emu3Params(flavour="debug", **{**SMALL, **overrides}))


def problems(count: int = 3) -> list[Problem]:
    generator = torch.Generator().manual_seed(0)
    sides = [(28, 42), (42, 28), (56, 56)]
    return [
        Problem(
            id=f"p{i}",
            image=torch.rand(3, *sides[i % 3], generator=generator),
            question=f"which way to the goal {i}?",
            visual_thought=torch.rand(3, 40, 40, generator=generator),
        )
        for i in range(count)
    ]


def test_backend_contract(tmp_path):
    check_backend_contract(debug_backend(), problems(), tmp_path, max_tokens=8)


def test_images_become_token_grids_with_line_ends():
    backend = debug_backend()
    model = backend.build_model()
    pixels = backend.preprocess_image(torch.rand(3, 32, 48))
    assert pixels.shape == (3, 24, 32)  # area clamped to 1024, sides multiples of 8
    tokens = backend.image_tokens(model, pixels)
    header = backend.image_header(3, 4)
    assert tokens[: len(header)] == header and backend.decode(header[1:-1]) == "3*4"
    body = torch.tensor(tokens[len(header) : -2]).view(3, 5)  # (h, w + 1)
    assert (body[:, -1] == backend.ids["end_of_line"]).all()
    assert torch.isin(body[:, :-1], backend.code_to_token).all()
    assert tokens[-2:] == [backend.ids["end_of_frame"], backend.ids["image_end"]]
    assert len(tokens) == len(backend.image_tokens(None, pixels))


def test_visual_thoughts_have_the_grid_size_and_follow_the_seed():
    backend = debug_backend(vt_grid=(3, 5))
    model = backend.build_model()
    batch = problems(2)
    images = backend.generate_visual_thought(model, batch, torch.Generator().manual_seed(0))
    assert [image.size for image in images] == [(40, 24), (40, 24)]  # (width, height) = grid * 8
    again = backend.generate_visual_thought(model, batch, torch.Generator().manual_seed(0))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(images, again))
    other = backend.generate_visual_thought(model, batch, torch.Generator().manual_seed(1))
    assert any(a.tobytes() != b.tobytes() for a, b in zip(images, other))


def test_saved_checkpoint_loads_alone(tmp_path):
    backend = debug_backend()
    model = backend.build_model()
    backend.save_pretrained(model, tmp_path / "ckpt")
    names = {path.name for path in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= names
    reloaded_backend = Emu3Backend(Emu3Params(checkpoint=str(tmp_path / "ckpt"), checkpoint_kind="gen", **SMALL))
    reloaded = reloaded_backend.build_model()
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert reloaded_backend.vocabulary == backend.vocabulary
    assert reloaded_backend.encode("move left <|image start|>") == backend.encode("move left <|image start|>")
    fresh = backend.build_model()
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.add_(1.0)
    backend.load_weights(fresh, tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_legacy_key_names_load(tmp_path):
    from safetensors.torch import save_file

    from opsd_emu3.state_dict import WEIGHTS

    backend = debug_backend()
    model = backend.build_model()
    backend.save_pretrained(model, tmp_path / "ckpt")
    legacy = {}
    for name, tensor in model.state_dict().items():
        name = name.replace("model.text_model.", "text_model.model.").replace("model.vqmodel.", "vqmodel.")
        legacy[name.replace("lm_head.", "text_model.lm_head.")] = tensor.clone().contiguous()
    save_file(legacy, str(tmp_path / "ckpt" / WEIGHTS))
    fresh = debug_backend(seed=1).build_model()
    backend.load_weights(fresh, tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_random_flavour_is_seeded():
    first, second = debug_backend().build_model(), debug_backend().build_model()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    other = debug_backend(seed=1).build_model()
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_unsupported_settings_are_refused_early(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_kind is required"):
        Emu3Params(checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="backend.checkpoint is required"):
        Emu3Params()
    with pytest.raises(ConfigError, match="lacks config.json"):
        Emu3Backend(Emu3Params(checkpoint=str(tmp_path), checkpoint_kind="chat"))
    with pytest.raises(ConfigError, match="positions"):
        debug_backend(image_max_pixels=512 * 512)
    with pytest.raises(ConfigError, match="vt_grid"):
        debug_backend(vt_grid=(40, 40))


def test_chat_checkpoint_refuses_to_draw(tmp_path):
    backend = debug_backend()
    model = backend.build_model()
    backend.save_pretrained(model, tmp_path / "chat")
    chat = Emu3Backend(Emu3Params(checkpoint=str(tmp_path / "chat"), checkpoint_kind="chat", **SMALL))
    with pytest.raises(CapabilityError, match="Emu3-Chat was not trained to generate images"):
        chat.generate_visual_thought(model, problems(1))


def test_run_settings_the_model_cannot_serve_are_refused_when_the_run_starts(tmp_path):
    from opsd_core.api import ConfigError, load_config

    backend = debug_backend()
    config = load_config(EXAMPLES / "emu3-debug.toml", ["sampling.max_forward_tokens=5000"])
    with pytest.raises(ConfigError, match="sampling.max_forward_tokens = 5000"):
        backend.check_run(config)
    backend.check_run(load_config(EXAMPLES / "emu3-debug.toml"))
    saved = tmp_path / "ckpt"
    backend.save_pretrained(backend.build_model(), saved)
    chat = Emu3Backend(Emu3Params(checkpoint=str(saved), checkpoint_kind="chat", **SMALL))
    with pytest.raises(ConfigError, match="checkpoint_kind = 'chat'"):
        chat.check_run(load_config(EXAMPLES / "emu3-debug.toml"))


def test_images_are_tokenised_as_at_inference_whatever_the_models_mode():
    """The VQ encoder holds BatchNorm layers: in train mode they would use each image's own
    statistics and move their running ones, so the student (train mode) and the teacher (eval)
    would see different codes for one image, and a resumed run would differ from a straight one."""
    backend = debug_backend()
    model = backend.build_model()
    pixels = backend.preprocess_image(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))).unsqueeze(0)
    vq = model.model.vqmodel
    buffers = {name: value.clone() for name, value in vq.named_buffers()}
    model.train()
    trained = backend._encode(vq, pixels)
    assert vq.training, "the model's mode is restored"
    assert all(torch.equal(value, buffers[name]) for name, value in vq.named_buffers()), "running statistics moved"
    model.eval()
    assert torch.equal(trained, backend._encode(vq, pixels))


def test_a_drawing_checkpoint_draws_the_visual_thoughts_while_chat_answers(tmp_path):
    """Chat (seed 0) answers, a second checkpoint (seed 1) draws: the images are the second
    model's, whatever model is passed, and a run that generates visual thoughts is accepted."""
    from opsd_core.api import load_config

    backend = debug_backend()
    backend.save_pretrained(backend.build_model(), tmp_path / "chat")
    gen = debug_backend(seed=1)
    gen_model = gen.build_model()
    gen.save_pretrained(gen_model, tmp_path / "gen")
    pair = Emu3Backend(
        Emu3Params(checkpoint=str(tmp_path / "chat"), checkpoint_kind="chat", drawing_checkpoint=str(tmp_path / "gen"), **SMALL)
    )
    answering = pair.build_model()
    batch = problems(2)
    drawn = pair.generate_visual_thought(answering, batch, torch.Generator().manual_seed(0))
    expected = gen.generate_visual_thought(gen_model, batch, torch.Generator().manual_seed(0))
    assert [image.tobytes() for image in drawn] == [image.tobytes() for image in expected]
    own = backend.generate_visual_thought(answering, batch, torch.Generator().manual_seed(0))
    assert [image.tobytes() for image in drawn] != [image.tobytes() for image in own]
    assert not any(p.requires_grad for p in pair.drawing_model().parameters())
    pair.check_run(load_config(EXAMPLES / "emu3-debug.toml"))


def test_drawing_checkpoints_that_cannot_serve_are_refused(tmp_path):
    import json

    with pytest.raises(ValueError, match="draws itself"):
        Emu3Params(checkpoint=str(tmp_path), checkpoint_kind="gen", drawing_checkpoint=str(tmp_path))
    with pytest.raises(ConfigError, match="backend.drawing_checkpoint: .* lacks config.json"):
        debug_backend(drawing_checkpoint=str(tmp_path / "missing"))
    backend = debug_backend()
    backend.save_pretrained(backend.build_model(), tmp_path / "other")
    config_file = tmp_path / "other" / "config.json"
    config = json.loads(config_file.read_text())
    config["vocabulary_map"]["<|extra_200|>"] += 1
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="another vocabulary"):
        debug_backend(drawing_checkpoint=str(tmp_path / "other"))


@pytest.mark.parametrize("max_shard_bytes", [None, 200_000])
def test_the_export_loads_with_transformers_in_bf16(tmp_path, max_shard_bytes):
    from transformers import Emu3ForConditionalGeneration

    check_transformers_export(debug_backend(), Emu3ForConditionalGeneration, tmp_path, max_shard_bytes)
