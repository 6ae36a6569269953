"""Pretraining pieces: the batch (detour moves untrained), the schedule, one step, the gate."""

import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from opsd_tiny.backend import TinyBackend
from opsd_tiny.config import FrozenLakeParams, TinyBackendParams
from opsd_tiny.pretrain import Gate, Recipe, training_batch, warmup_cosine
from opsd_tiny.task import FrozenLakeTask


def _batch(noise_fraction=0.0, detour_probability=1.0, size=16):
    backend = TinyBackend(TinyBackendParams(checkpoint="random"))
    task = FrozenLakeTask(FrozenLakeParams(detour_probability=detour_probability))
    problems = [task.problem(0, index, "pretrain") for index in range(size)]
    recipe = Recipe(batch=size)
    return backend, training_batch(backend, task, problems, np.random.default_rng(0), recipe, noise_fraction)


def test_batch_mixes_formats_and_masks_only_the_detour_move():
    backend, (contexts, completions, targets) = _batch()
    teacher_rows = sum(len(context.segments) == 6 for context in contexts)
    assert teacher_rows == round(0.8 * len(contexts))
    mask = completions.row_mask()
    for row, length in enumerate(completions.lengths.tolist()):
        untrained = (~mask[row, :length]).nonzero().flatten().tolist()
        assert len(untrained) <= 1 and all(index % 2 == 0 for index in untrained)  # a move, never a cell
        assert bool(mask[row, length]) and int(targets[row, length]) == backend.vocabulary.eos_id
        assert torch.equal(targets[row, :length], completions.tokens[row, :length])
    assert int((~completions.sampled & (completions.tokens != backend.vocabulary.pad_id)).sum()) > 0


def test_noise_fine_tune_replaces_some_visual_thoughts_by_pixels():
    _, (contexts, _, _) = _batch(noise_fraction=1.0, detour_probability=0.0)
    thoughts = [context.get("visual_thought") for context in contexts if len(context.segments) == 6]
    assert thoughts and all(t.pixels is not None and t.pixels.shape == (3, 40, 40) for t in thoughts)


def test_schedule_warms_up_then_decays_to_zero():
    factor = warmup_cosine(10, 100)
    assert factor(0) == 0.1 and factor(9) == 1.0 and factor(10) == 1.0
    assert math.isclose(factor(55), 0.5, abs_tol=1e-9) and factor(100) == 0.0


def test_one_step_lowers_the_loss_on_its_batch():
    torch.manual_seed(0)
    backend, (contexts, completions, targets) = _batch(size=8)
    model = backend.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss():
        rows = backend.completion_logits(model, contexts, completions)
        losses = F.cross_entropy(rows.logits.flatten(0, 1), targets.flatten(), reduction="none")
        return losses[rows.mask.flatten()].mean()

    before = loss()
    before.backward()
    optimizer.step()
    assert loss().item() < before.item()


def test_gate_names_what_failed():
    gate = Gate()
    assert gate.failures(0.75, 0.99) == []
    assert gate.failures(0.90, 0.99) == ["student 0.900 > teacher - 0.15"]
    assert gate.failures(0.30, 0.90) == ["teacher 0.900 < 0.95", "student 0.300 < 0.65"]


@dataclass(frozen=True)
class QuickRecipe(Recipe):
    batch: int = 8
    warmup: int = 1
    finetune_steps: int = 1


def test_main_writes_a_checkpoint_with_its_provenance_once_a_seed_passes(tmp_path, monkeypatch, capsys):
    from opsd_tiny import pretrain

    monkeypatch.setattr(pretrain, "Recipe", QuickRecipe)
    verdicts = iter([["the first seed fails"], []])
    monkeypatch.setattr(pretrain.Gate, "failures", lambda self, student, teacher: next(verdicts))
    out = tmp_path / "ckpt"
    assert pretrain.main(["--out", str(out), "--seed", "3", "--steps", "2", "--eval-size", "10", "--threads", "1"]) == 0
    assert "seed 4 passed the gate" in capsys.readouterr().out
    provenance = json.loads((out / "config.json").read_text())["pretraining"]
    assert provenance["seed"] == 4 and provenance["seeds_tried"] == [3, 4] and provenance["recipe"]["steps"] == 2
    assert provenance["command"].startswith("python -m opsd_tiny.pretrain --out")
    assert TinyBackend(TinyBackendParams(checkpoint=str(out))).build_model() is not None
    assert not (tmp_path / "ckpt.partial").exists()
