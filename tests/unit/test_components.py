"""Building a run's components: each role by name, and the capability checks made once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opsd_core.components import build_components, check_components, check_declared_capabilities
from opsd_core.config import load_config
from opsd_core.contexts.paper import PaperContextBuilder
from opsd_core.errors import ConfigError, PluginError
from opsd_core.interfaces import Backend, Capabilities, Task
from opsd_core.sampling import BatchedSampler

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"


def _components(*overrides, world_size=1):
    return build_components(load_config(QUICKSTART, overrides), world_size=world_size)


def _with_backend_class(components, cls):
    """``components`` whose backend is the same object re-classed as ``cls``."""
    backend = cls.__new__(cls)
    backend.__dict__.update(components.backend.__dict__)
    components.backend = backend
    return components


def test_every_role_is_built_by_name_with_its_params():
    components = _components("sampler.sync_every=3", "context.system_prompt='navigate the frozen lake'")
    assert isinstance(components.sampler, BatchedSampler) and components.sampler.sync_every == 3
    assert components.sampler.temperature == components.config.sampling.temperature
    assert isinstance(components.context, PaperContextBuilder)
    assert components.context.ref_intro == components.backend.context_builder().ref_intro


def test_context_params_replace_the_backends_texts():
    components = _components("context.transition='answer now'")
    assert components.context.transition == "answer now"
    assert components.context.system_prompt == components.backend.context_builder().system_prompt


def test_unknown_sampler_or_context_names_are_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match="unknown sampler 'batchd'.*batched.*Did you mean 'batched'"):
        _components("sampler.name='batchd'")
    with pytest.raises(ConfigError, match="unknown context 'papr'.*paper"):
        _components("context.name='papr'")


def test_a_declared_capability_without_its_method_is_a_plugin_error():
    backend = _components().backend

    class Boasting(type(backend)):
        capabilities = Capabilities(hidden_states=True, visual_thoughts=True, image_skips=True)

    boasting = Boasting.__new__(Boasting)
    with pytest.raises(PluginError) as error:
        check_declared_capabilities(boasting)
    message = str(error.value)
    assert "visual_thoughts (needs generate_visual_thought)" in message
    assert "image_skips (needs image_skip_tokens)" in message
    assert "hidden_states" not in message  # the tiny backend implements completion_hidden


def test_drawing_visual_thoughts_needs_the_capability():
    with pytest.raises(ConfigError, match="visual_thoughts = 'generate'.*cannot draw"):
        _components("sampling.visual_thoughts='generate'")  # build_components checks once
    check_components(_components("sampling.visual_thoughts='stored'"))


def test_several_processes_need_sharding_and_sharded_hidden_states_for_the_fused_loss():
    components = _components("divergence.fused=true")

    class Shards(type(components.backend)):
        capabilities = Capabilities(hidden_states=True, sharding=True)

        def parallelize(self, model, mesh, config):
            return model

    with pytest.raises(ConfigError, match="needs sharding"):
        check_components(components, world_size=2)
    _with_backend_class(components, Shards)
    check_components(components)  # one process: the fused loss has the whole lm_head
    with pytest.raises(ConfigError, match="sharded_hidden_states"):
        check_components(components, world_size=2)

    class ShardedHidden(Shards):
        capabilities = Capabilities(hidden_states=True, sharded_hidden_states=True, sharding=True)

    _with_backend_class(components, ShardedHidden)
    check_components(components, world_size=2)


def test_the_backends_own_check_runs_after_the_capability_checks():
    components = _components()
    seen = []

    class Checking(type(components.backend)):
        def check_run(self, config):
            seen.append(config)

    _with_backend_class(components, Checking)
    check_components(components)
    assert seen == [components.config]


def test_backend_base_methods_refuse_undeclared_capabilities():
    backend = _components().backend
    for method, args in (("model_skeleton", ()), ("generate_visual_thought", (None, []))):
        with pytest.raises(Exception, match=type(backend).__name__):
            getattr(Backend, method)(backend, *args)


def test_an_evaluation_only_task_is_refused_for_training_and_accepted_for_evaluation():
    components = _components()

    class Benchmark(type(components.task)):
        trains = False

    components.task.__class__ = Benchmark
    with pytest.raises(ConfigError, match="evaluation-only"):
        check_components(components)
    check_components(components, training=False)
    with pytest.raises(Exception, match="evaluation-only"):
        Task.train_problems(components.task, 0)


def test_evaluation_reports_the_tasks_own_aggregate():
    from opsd_core.evaluation import evaluate

    components = _components("eval.max_completion_tokens=4")

    class Paired(type(components.task)):
        def aggregate(self, problems, scores):
            pairs = [a.correct and b.correct for a, b in zip(scores[::2], scores[1::2])]
            return super().aggregate(problems, scores) | {"pair_accuracy": sum(pairs) / len(pairs)}

    components.task.__class__ = Paired
    torch.manual_seed(0)
    model = components.backend.build_model().eval()
    problems = list(components.task.eval_problems(6))
    result = evaluate(components.backend, model, components.task, problems, ("student",), 6, 4)["student"]
    hits = [record["correct"] for record in result.records]
    summary = result.summary()
    assert summary["pair_accuracy"] == sum(a and b for a, b in zip(hits[::2], hits[1::2])) / 3
    assert summary["accuracy"] == sum(hits) / 6


def test_the_backend_is_placed_on_the_run_device_with_fp32_masters_whenever_it_trains():
    from opsd_core.components import build_backend

    config = load_config(QUICKSTART, ["run.precision='bf16'", "run.device='cpu'"])
    trained = build_components(config).backend
    assert trained.device == torch.device("cpu") and trained.dtype == torch.float32
    assert {p.dtype for p in trained.build_model().parameters()} == {torch.float32}
    inferring = build_backend(config, training=False)
    assert inferring.dtype == torch.bfloat16
    assert {p.dtype for p in inferring.build_model().parameters()} == {torch.bfloat16}
    assert build_backend(load_config(QUICKSTART, ["run.precision='fp32'"]), training=False).dtype == torch.float32


@pytest.mark.parametrize(
    ("override", "moved_to"),
    [
        ("backend.device='cpu'", "run.device"),
        ("backend.dtype='bfloat16'", "run.precision"),
        ("backend.threads=2", "run.threads"),
        ("train.mixed_precision='bf16'", "run.precision"),
    ],
)
def test_settings_that_became_run_wide_name_their_new_place(override, moved_to):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}: this setting moved to {moved_to}"):
        load_config(QUICKSTART, [override])


def test_a_cuda_device_that_is_not_there_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="run.device: CUDA requested but no CUDA device is available.*'cuda:1'"):
        _components("run.device='cuda:1'")
    with pytest.raises(ConfigError, match="run.device"):
        load_config(QUICKSTART, ["run.device='gpu'"])


def test_evaluation_and_diagnostics_decode_with_the_runs_sampler_kind():
    from opsd_core.evaluation import evaluate

    components = _components("sampler.sync_every=3", "eval.max_completion_tokens=5")
    greedy = components.evaluation_sampler()
    assert isinstance(greedy, BatchedSampler) and greedy.sync_every == 3
    assert (greedy.temperature, greedy.max_completion_tokens, greedy.max_image_skips) == (0.0, 5, 0)
    same_policy = components.sampler_with()
    assert (same_policy.temperature, same_policy.max_completion_tokens) == (1.0, components.config.sampling.max_completion_tokens)
    assert components.config.sampling.temperature == 1.0  # the run's own policy is untouched

    calls = []

    class Recording(BatchedSampler):
        def sample(self, model, contexts, generator=None, seeds=None):
            calls.append(len(contexts))
            return super().sample(model, contexts, generator, seeds)

    recording = Recording(components.backend, 0.0, 5, 0)
    model = components.backend.build_model().eval()
    problems = list(components.task.eval_problems(4))
    evaluate(components.backend, model, components.task, problems, ("student",), 2, sampler=recording)
    assert calls == [2, 2]
