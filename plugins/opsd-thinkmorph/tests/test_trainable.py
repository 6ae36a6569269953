"""The trainable set of ThinkMorph: the generation parameters are frozen by default, and
freezing them is exact.

OPSD's student and teacher contexts hold text and ViT images only, so the generation expert
(``*_moe_gen``), the time embedder and the latent connectors receive no gradient; AdamW then
leaves them untouched at weight decay 0. Two steps of the debug flavour (with its generation
modules) trained with them frozen and with everything trainable, as the paper's code does,
must give bit-identical student weights and EMA teacher weights (the teacher's copies of the
generation parameters, averaged with themselves when everything trains, agree up to rounding).
"""

from __future__ import annotations

import pytest
import torch
from opsd_thinkmorph.backend import ThinkMorphBackend
from opsd_thinkmorph.config import ThinkMorphParams

from opsd_core.testing import fsdp
from opsd_core.testing.trainer import Ranks

STEPS = 2


def backend(train_generation: bool) -> ThinkMorphBackend:
    return ThinkMorphBackend(
        ThinkMorphParams(
            flavour="debug", train_generation=train_generation, vit_max_size=56, vit_min_size=28,
            vae_max_size=64, vae_min_size=32,
        )
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``{train_generation: trainer}`` after the same STEPS steps."""
    config = fsdp.comparison_config(steps=STEPS, checkpoint_every=0)
    assert config.optim.weight_decay == 0
    trainers = {}
    for train_generation in (False, True):
        directory = tmp_path_factory.mktemp(f"train-generation-{train_generation}")
        trainer = fsdp.make_trainer(lambda: backend(train_generation), directory, Ranks(), config)
        for _ in range(STEPS):
            trainer.train_step()
        trainers[train_generation] = trainer
    return trainers


def test_the_generation_parameters_are_frozen_by_default():
    model = backend(False).build_model().requires_grad_(True)
    frozen = set(backend(False).frozen_parameters(model))
    names = [name for name, _ in model.named_parameters()]
    assert frozen == {name for name in names if "_moe_gen" in name or name.split(".")[0] in ("time_embedder", "vae2llm", "llm2vae")}
    assert any("mlp_moe_gen" in name for name in frozen) and "vae2llm.weight" in frozen
    assert backend(True).frozen_parameters(model) == []


def test_freezing_gives_the_same_updates_as_training_everything(trained):
    frozen, everything = trained[False], trained[True]
    assert 0 < frozen.parameter_counts.trainable < everything.parameter_counts.trainable
    assert frozen.parameter_counts.frozen + frozen.parameter_counts.trainable == everything.parameter_counts.trainable
    start = backend(True).build_model()
    generation = set(backend(False).frozen_parameters(start))
    for name in ("student", "teacher"):
        expected = getattr(everything, name).state_dict()
        for key, value in getattr(frozen, name).state_dict().items():
            if name == "teacher" and key in generation:
                # The paper's EMA averages each unchanged weight with itself: equal up to rounding.
                torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=0)
            else:
                assert torch.equal(value, expected[key]), f"{name} {key} differs"
    # Training everything: the generation parameters got no gradient and kept their weights.
    for key, value in everything.student.named_parameters():
        if key in generation:
            assert value.grad is None and torch.equal(value, start.get_parameter(key))


def test_frozen_parameters_have_no_optimizer_state_and_are_shared_with_the_teacher(trained):
    trainer = trained[False]
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    teacher = dict(trainer.teacher.named_parameters())
    for name, parameter in trainer.student.named_parameters():
        assert (id(parameter) in optimized) == parameter.requires_grad
        assert (teacher[name] is parameter) == (not parameter.requires_grad)
