"""What the thinkmorph backend tells the memory planner: the decoder's sizes, and parameter
groups that set the generation expert apart, counted on the meta skeleton (the full
BAGEL-7B-MoT in seconds, no memory)."""

from __future__ import annotations

from opsd_thinkmorph.backend import ThinkMorphBackend
from opsd_thinkmorph.config import ThinkMorphParams

GENERATION_EXPERT = "language_model (generation expert)"


def groups(backend: ThinkMorphBackend, model) -> dict[str, int]:
    counted: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        group = backend.parameter_group(name)
        counted[group] = counted.get(group, 0) + parameter.numel()
    return counted


def test_the_7b_skeleton_holds_14_6_billion_parameters_nearly_half_of_them_the_generation_expert():
    backend = ThinkMorphBackend(ThinkMorphParams(flavour="7b-random"))
    counted = groups(backend, backend.model_skeleton())
    assert sum(counted.values()) == 14_575_018_464
    assert counted[GENERATION_EXPERT] == 6_525_628_928  # the second expert of every Qwen2 layer
    assert counted["language_model"] == 7_615_623_680
    assert set(counted) == {
        "language_model", GENERATION_EXPERT, "vit_model", "connector", "time_embedder", "vae2llm", "llm2vae",
    }  # fmt: skip


def test_the_debug_skeleton_counts_what_the_built_model_holds():
    backend = ThinkMorphBackend(ThinkMorphParams(flavour="debug"))
    assert groups(backend, backend.model_skeleton()) == groups(backend, backend.build_model())


def test_memory_shape_is_the_llm_config():
    shape = ThinkMorphBackend(ThinkMorphParams(flavour="7b-random")).memory_shape()
    assert (shape.hidden_size, shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim) == (3584, 28, 28, 4, 128)
    assert shape.vocab_size == 152064 and shape.intermediate_size == 18944
    # ViT 70 x 70 patches, two 64 x 64 latent blocks, the text turns; three guidance contexts.
    assert shape.visual_thought_tokens == 4900 + 2 * 4096 + 512 and shape.visual_thought_passes == 3
    understanding_only = ThinkMorphBackend(ThinkMorphParams(flavour="7b-random", generation=False))
    assert understanding_only.memory_shape().visual_thought_tokens == 0


def test_random_layers_builds_the_full_width_with_fewer_decoder_layers():
    import pytest
    from pydantic import ValidationError

    full = groups(*_skeleton(ThinkMorphParams(flavour="7b-random")))
    four = groups(*_skeleton(ThinkMorphParams(flavour="7b-random", random_layers=4)))
    # Only the decoder's layers go: embeddings, lm_head, norms, ViT and connectors stay.
    for group in ("language_model", GENERATION_EXPERT):
        per_layer, rest = divmod(full[group] - four[group], 24)
        assert rest == 0 and per_layer > 0  # 24 identical layers fewer
    assert four[GENERATION_EXPERT] == 4 * (full[GENERATION_EXPERT] - four[GENERATION_EXPERT]) // 24 + 3584  # + final norm
    assert {k: v for k, v in four.items() if k not in ("language_model", GENERATION_EXPERT)} == {
        k: v for k, v in full.items() if k not in ("language_model", GENERATION_EXPERT)
    }
    assert ThinkMorphBackend(ThinkMorphParams(flavour="7b-random", random_layers=4)).memory_shape().num_layers == 4
    with pytest.raises(ValidationError, match="random_layers applies to flavour '7b-random' only"):
        ThinkMorphParams(flavour="debug", random_layers=4)


def _skeleton(params: ThinkMorphParams):
    backend = ThinkMorphBackend(params)
    return backend, backend.model_skeleton()
