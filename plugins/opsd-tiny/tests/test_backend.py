"""The tiny backend: contract equivalences, checkpoints, vocabulary."""

import json

import pytest
import torch

from opsd_core.errors import CapabilityError, CheckpointError
from opsd_core.testing.backend_contract import check_backend_contract
from opsd_tiny.backend import TinyBackend
from opsd_tiny.config import TinyBackendParams
from opsd_tiny.task import FrozenLakeTask


@pytest.fixture(scope="module")
def random_backend():
    return TinyBackend(TinyBackendParams(checkpoint="random"))


def test_backend_contract_on_random_weights(random_backend, tmp_path):
    torch.manual_seed(0)
    check_backend_contract(random_backend, FrozenLakeTask().eval_problems(5), tmp_path)


def test_backend_contract_on_the_shipped_checkpoint(tmp_path):
    check_backend_contract(TinyBackend(), FrozenLakeTask().eval_problems(5), tmp_path)


def test_encode_decode_round_trip(random_backend):
    text = "R c7 D c12 U c7"
    assert random_backend.decode(random_backend.encode(text)) == text
    with pytest.raises(ValueError, match="not in the tiny vocabulary"):
        random_backend.encode("jump")


def test_contexts_are_laid_out_as_in_the_paper(random_backend):
    problem = FrozenLakeTask().eval_problems(1)[0]
    pair = random_backend.context_builder().build(problem)
    assert pair.student.names() == ("system", "problem_image", "question")
    assert pair.teacher.names() == ("system", "problem_image", "question", "ref_intro", "visual_thought", "transition")
    assert random_backend.context_length(pair.student) == 39
    assert random_backend.context_length(pair.teacher) == 72


def test_missing_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors.*vocab.json"):
        TinyBackend(TinyBackendParams(checkpoint=str(tmp_path)))


def test_shape_mismatch_is_a_clear_error(random_backend, tmp_path):
    model = random_backend.build_model()
    random_backend.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architecture"]["d_model"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape"):
        TinyBackend(TinyBackendParams(checkpoint=str(tmp_path))).build_model()


def test_position_limit_is_reported(random_backend):
    model = random_backend.build_model()
    context = random_backend.context_builder().build(FrozenLakeTask().eval_problems(1)[0]).teacher
    with pytest.raises(CapabilityError, match="positions"):
        random_backend.start_decoding(model, [context], 500)


def test_shipped_checkpoint_reads_the_visual_thought():
    from opsd_core.evaluation import evaluate

    backend, task = TinyBackend(), FrozenLakeTask()
    results = evaluate(backend, backend.build_model(), task, task.eval_problems(200), ("teacher",), 200, 24)
    assert results["teacher"].accuracy >= 0.9
