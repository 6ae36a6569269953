"""The tiny backend: rendering, cached decoding, batching, checkpoints, the shipped weights."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from opsd_core.api import VISUAL_THOUGHT, CapabilityError, CheckpointError, CompletionBatch, ImageSegment
from opsd_core.testing.backend_contract import check_backend_contract, decode_logits
from opsd_tiny import state_dict
from opsd_tiny.backend import TinyBackend
from opsd_tiny.config import SHIPPED_CHECKPOINT, TinyBackendParams
from opsd_tiny.pretrain import greedy_accuracy, sample_completions
from opsd_tiny.task import FrozenLakeTask


@pytest.fixture(scope="module")
def backend():
    return TinyBackend(TinyBackendParams(checkpoint="random"))


@pytest.fixture(scope="module")
def model(backend):
    torch.manual_seed(0)
    return backend.build_model().eval()


@pytest.fixture(scope="module")
def problems():
    return FrozenLakeTask().eval_problems(6)


def _mixed_contexts(backend, problems):
    """Student and teacher contexts interleaved, so rows differ in length."""
    builder = backend.context_builder()
    return [builder.student_context(p) if i % 2 else builder.build(p).teacher for i, p in enumerate(problems)]


def _random_completions(backend, batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (batch,), generator=generator)
    lengths[0] = 0  # an empty completion still has its EOS row
    tokens = torch.randint(0, backend.vocabulary.size, (batch, int(lengths.max())), generator=generator)
    sampled = torch.arange(tokens.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    tokens[~sampled] = backend.vocabulary.pad_id
    return CompletionBatch(tokens, lengths, sampled, torch.ones(batch, dtype=torch.bool))


def test_model_size_and_vocabulary(backend, model):
    assert sum(p.numel() for p in model.parameters()) == 855_040
    vocabulary = backend.vocabulary
    assert vocabulary.size == 52 and vocabulary.valid_size == 52
    assert backend.decode([vocabulary.eos_id, vocabulary.special["answer"]]) == "<eos> <ans>"


def test_contexts_are_laid_out_as_in_the_paper(backend, problems):
    pair = backend.context_builder().build(problems[0])
    assert pair.student.names() == ("system", "problem_image", "question")
    assert pair.teacher.names() == ("system", "problem_image", "question", "ref_intro", "visual_thought", "transition")
    assert backend.context_length(pair.student) == 40 and backend.context_length(pair.teacher) == 73
    rendered = backend.render(pair.student)
    assert backend.decode(rendered.tokens[:6]) == "<bos> <sys> navigate the frozen lake"
    assert backend.decode(rendered.tokens[-7:]) == "find path S to G ? <ans>"
    assert rendered.patch_cells[7:32] == list(range(25)) and set(rendered.blocks[6:33]) == {1}


def test_encode_decode_round_trip(backend):
    text = "R c7 D c12 U c7 L c24"
    assert backend.decode(backend.encode(text)) == text
    assert backend.decode([0, 999, -1]) == "<pad>"
    with pytest.raises(ValueError, match="jump"):
        backend.encode("jump over")


def test_kv_cached_decoding_equals_the_full_forward(backend, model, problems):
    contexts = _mixed_contexts(backend, problems)
    completions = _random_completions(backend, len(contexts))
    with torch.no_grad():
        full = backend.completion_logits(model, contexts, completions)
        cached = decode_logits(backend, model, contexts, completions)
    assert full.logits.shape == (len(contexts), completions.tokens.shape[1] + 1, 52)
    gap = (full.logits - cached).abs()[full.mask]
    assert float(gap.max()) < 1e-5


def test_batched_rows_equal_rows_alone_and_align_n_plus_one(backend, model, problems):
    contexts = _mixed_contexts(backend, problems)
    completions = _random_completions(backend, len(contexts), seed=1)
    with torch.no_grad():
        together = backend.completion_logits(model, contexts, completions)
        assert torch.equal(together.mask, completions.row_mask())
        for row, length in enumerate(completions.lengths.tolist()):
            alone = backend.completion_logits(
                model,
                [contexts[row]],
                CompletionBatch(
                    completions.tokens[row : row + 1, :length],
                    completions.lengths[row : row + 1],
                    completions.sampled[row : row + 1, :length],
                    completions.finished[row : row + 1],
                ),
            ).logits[0]
            assert alone.shape[0] == length + 1
            assert float((alone - together.logits[row, : length + 1]).abs().max()) < 1e-5


def test_segment_pixels_are_used_as_given(backend, model, problems):
    teacher = backend.context_builder().build(problems[0]).teacher
    thought = teacher.get(VISUAL_THOUGHT)
    same = teacher.with_segment(ImageSegment(VISUAL_THOUGHT, thought.image, backend.preprocess_image(thought.image)))
    noise = teacher.with_segment(ImageSegment(VISUAL_THOUGHT, thought.image, torch.randn(3, 40, 40)))
    completions = _random_completions(backend, 1, seed=2)
    with torch.no_grad():
        reference, again, noisy = (
            backend.completion_logits(model, [c], completions).logits for c in (teacher, same, noise)
        )
    assert torch.equal(reference, again) and not torch.allclose(reference, noisy)


def test_preprocessing_is_two_x_minus_one_for_tensors_and_pil(backend, problems):
    image = problems[0].image
    assert torch.equal(backend.preprocess_image(image), image * 2 - 1)
    picture = Image.fromarray((image.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8))
    enlarged = picture.resize((160, 160), Image.NEAREST)
    for pil in (picture, enlarged):
        assert float((backend.preprocess_image(pil) - (image * 2 - 1)).abs().max()) <= 1 / 255 + 1e-6
    with pytest.raises(ValueError, match=r"\(3, 40, 40\)"):
        backend.preprocess_image(torch.zeros(3, 32, 32))


def test_save_load_round_trip_is_exact(backend, model, tmp_path):
    backend.save_pretrained(model, tmp_path, {"note": "kept"})
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(state_dict.FILES)
    assert json.loads((tmp_path / "config.json").read_text())["note"] == "kept"
    reloaded = TinyBackend(TinyBackendParams(checkpoint=str(tmp_path)))
    fresh = reloaded.build_model()
    assert reloaded.vocab.tokens == backend.vocab.tokens and reloaded.config == backend.config
    for (name, expected), (_, loaded) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(expected, loaded), name


def test_missing_files_are_named(backend, model, tmp_path):
    with pytest.raises(CheckpointError, match="missing model.safetensors, config.json, vocab.json"):
        TinyBackend(TinyBackendParams(checkpoint=str(tmp_path / "absent")))
    backend.save_pretrained(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors .*opsd_tiny.pretrain"):
        backend.load_weights(model, tmp_path)


def test_shape_mismatch_is_a_clear_error(backend, model, tmp_path):
    backend.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architecture"]["d_model"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shapes differ"):
        TinyBackend(TinyBackendParams(checkpoint=str(tmp_path))).build_model()


def test_position_limit_is_reported(backend, model, problems):
    teacher = backend.context_builder().build(problems[0]).teacher
    with pytest.raises(CapabilityError, match="positions"):
        backend.start_decoding(model, [teacher], 100)


def test_contract_of_the_core_holds(backend, problems, tmp_path):
    torch.manual_seed(0)
    check_backend_contract(backend, problems[:4], tmp_path, atol=1e-5)


def test_shipped_checkpoint_loads_and_reads_the_visual_thought():
    backend = TinyBackend()
    assert backend.directory == SHIPPED_CHECKPOINT
    provenance = json.loads((SHIPPED_CHECKPOINT / "config.json").read_text())["pretraining"]
    assert provenance["accuracy"]["teacher"] >= 0.95 and provenance["recipe"]["steps"] == 1500
    task = FrozenLakeTask()
    model = backend.build_model().eval()
    problems = task.eval_problems(200)
    assert greedy_accuracy(backend, task, model, problems, "teacher") >= 0.9
    student = backend.context_builder().student_context(problems[0])
    completions = sample_completions(backend, model, [student], 0.0)
    assert completions.finished.all() and completions.lengths[0] % 2 == 0


def test_completion_hidden_times_the_head_gives_the_completion_logits(backend, model, problems):
    contexts = _mixed_contexts(backend, problems)
    completions = _random_completions(backend, len(contexts), seed=3)
    rows = backend.completion_logits(model, contexts, completions)
    hidden = backend.completion_hidden(model, contexts, completions)
    assert hidden.weight is model.lm_head.weight
    assert hidden.hidden.shape == (*rows.logits.shape[:2], model.config.d_model)
    assert torch.equal(hidden.mask, rows.mask)
    torch.testing.assert_close(hidden.hidden @ hidden.weight.T, rows.logits, rtol=1e-5, atol=1e-5)


def test_the_meta_skeleton_has_the_models_parameters_and_buffers():
    from opsd_core.testing.trainer import skeleton_mismatch

    backend = TinyBackend()
    skeleton = backend.model_skeleton()
    assert all(parameter.is_meta for parameter in skeleton.parameters())
    assert skeleton_mismatch(skeleton, backend.build_model()) is None
