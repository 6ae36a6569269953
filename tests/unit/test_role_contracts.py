"""The built-in sampler and context builder pass the contracts plugin authors run, and the
contracts catch a sampler and a builder that break them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opsd_core.components import build_components
from opsd_core.config import load_config
from opsd_core.contexts.paper import PaperContextBuilder
from opsd_core.testing.role_contracts import check_context_contract, check_sampler_contract

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"


@pytest.fixture(scope="module")
def components():
    return build_components(load_config(QUICKSTART, ["sampling.max_completion_tokens=12"]))


@pytest.fixture(scope="module")
def problems(components):
    return list(components.task.eval_problems(3))


def test_the_batched_sampler_passes(components, problems):
    torch.manual_seed(0)
    model = components.backend.build_model().eval()
    contexts = [components.context.build(problem).student for problem in problems]
    check_sampler_contract(components.sampler, components.backend, model, contexts, max_completion_tokens=12)


def test_a_sampler_whose_rows_depend_on_the_batch_is_caught(components, problems):
    class BatchDependent:
        def sample(self, model, contexts, generator=None, seeds=None):
            shifted = [seed + len(contexts) for seed in seeds]  # the draw of a row now depends on its batch
            return components.sampler.sample(model, contexts, seeds=shifted)

    torch.manual_seed(0)
    model = components.backend.build_model().eval()
    contexts = [components.context.build(problem).student for problem in problems]
    with pytest.raises(AssertionError, match="sampled alone differs"):
        check_sampler_contract(BatchDependent(), components.backend, model, contexts)


def test_the_paper_context_passes(components, problems):
    check_context_contract(components.context, problems[0])


def test_a_builder_that_shows_the_student_the_visual_thought_is_caught(components, problems):
    class Leaky(PaperContextBuilder):
        def student_context(self, problem):
            return PaperContextBuilder.teacher_context(paper, problem, problem.visual_thought)

    paper = components.context
    with pytest.raises(AssertionError, match="student context"):
        check_context_contract(Leaky(paper.system_prompt, paper.ref_intro, paper.transition), problems[0])
