"""Training-loop mechanics on the embedded tiny UMM: gradients, EMA, accumulation, resume."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from opsd_core.components import build_components
from opsd_core.config import load_config
from opsd_core.contexts.noise import with_noise_visual_thought
from opsd_core.errors import CheckpointError, ConfigError, NonFiniteError
from opsd_core.trainer.checkpoint import list_checkpoints
from opsd_core.trainer.trainer import Phase, Trainer
from opsd_core.types import VISUAL_THOUGHT, ImageSegment
from opsd_core.rundir import MetricsLog

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"
SMALL = [
    "train.samples_per_step=4",
    "train.grad_accum=1",
    "schedule.total_steps=4",
    "schedule.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "sampling.max_completion_tokens=12",
]


def _setup(tmp_path, *overrides, phase=Phase("opsd"), name="run"):
    config = load_config(QUICKSTART, [*SMALL, *overrides])
    components = build_components(config)
    torch.manual_seed(0)
    student = components.backend.build_model()
    trainer = Trainer(components, student, tmp_path / name, MetricsLog(tmp_path / f"{name}-metrics.jsonl"), phase)
    return trainer


def test_teacher_gets_no_gradient_and_ema_follows_by_the_decay(tmp_path):
    trainer = _setup(tmp_path)
    before_teacher = {n: p.clone() for n, p in trainer.teacher.named_parameters()}
    trainer.train_step()
    assert all(p.grad is None for p in trainer.teacher.parameters())
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    decay = trainer.teacher_update.decay
    for name, student_parameter in trainer.student.named_parameters():
        expected = decay * before_teacher[name] + (1 - decay) * student_parameter.detach()
        torch.testing.assert_close(dict(trainer.teacher.named_parameters())[name], expected, rtol=0, atol=1e-6)
    moved = sum(not torch.equal(before_teacher[n], p) for n, p in trainer.teacher.named_parameters())
    assert moved > 0


def test_micro_batch_times_accumulation_is_invariant(tmp_path):
    # Sampled at temperature 1: each problem's draws are keyed by its place in the stream, so
    # both splits sample the same completions.
    whole = _setup(tmp_path, "train.samples_per_step=4", "train.grad_accum=1", name="a")
    split = _setup(tmp_path, "train.samples_per_step=2", "train.grad_accum=2", name="b")
    assert whole.sampler.temperature == 1.0
    metrics_whole = whole.train_step()
    metrics_split = split.train_step()
    assert metrics_whole["loss"] == pytest.approx(metrics_split["loss"], rel=1e-5, abs=1e-7)
    assert metrics_whole["grad_norm"] == pytest.approx(metrics_split["grad_norm"], rel=1e-4)
    # Compare the accumulated gradients, not the updated weights: Adam's first step is about
    # lr * sign(gradient), which turns float noise on gradients that are zero in exact
    # arithmetic (e.g. the key bias) into differences of a whole lr.
    for (name, a), (_, b) in zip(whole.student.named_parameters(), split.student.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_sampling_a_whole_step_at_once_gives_the_micro_batch_results(tmp_path):
    apart = _setup(tmp_path, "train.samples_per_step=2", "train.grad_accum=3", name="apart")
    together = _setup(tmp_path, "train.samples_per_step=2", "train.grad_accum=3", "sampling.whole_step=true", name="together")
    calls = []
    sample = together.sampler.sample
    together.sampler.sample = lambda model, contexts, **kwargs: calls.append(len(contexts)) or sample(
        model, contexts, **kwargs
    )
    for _ in range(2):
        metrics_apart, metrics_together = apart.train_step(), together.train_step()
        for key in ("loss", "kl", "completion_tokens", "finished"):
            assert metrics_together[key] == pytest.approx(metrics_apart[key], rel=1e-5, abs=1e-7), key
    assert calls == [6, 6]  # one decoding pass per step over its three micro-batches
    for (name, a), (_, b) in zip(apart.student.named_parameters(), together.student.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("phase", "adapters"),
    [
        (Phase("opsd"), []),
        (Phase("shuffled", shuffled_vt=True), []),
        (Phase("opsd"), ['backend.lora.target_modules=["qkv", "mlp.0"]', "backend.lora.rank=2", "backend.lora.dropout=0.1"]),
    ],
    ids=["opsd", "shuffled-vt", "lora"],
)
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, phase, adapters):
    if adapters:
        pytest.importorskip("peft")
    straight = _setup(tmp_path, *adapters, phase=phase, name="straight")
    straight.fit(progress=False)

    interrupted = _setup(tmp_path, *adapters, phase=phase, name="interrupted")
    interrupted.resume()
    while interrupted.step < 3:  # past the step-2 checkpoint, then "crash"
        interrupted._log(interrupted.train_step())
        if interrupted.step == 2:
            saved = interrupted.save()
    if adapters:  # a LoRA checkpoint holds the adapters, not the frozen base
        assert sorted(path.name for path in (saved / "student").iterdir()) == ["adapters.safetensors"]
    resumed = _setup(tmp_path, *adapters, phase=phase, name="interrupted")
    resumed.fit(progress=False)
    assert resumed.step == 4
    for left, right in ((straight.student, resumed.student), (straight.teacher, resumed.teacher)):
        for (name, a), (_, b) in zip(left.state_dict().items(), right.state_dict().items()):
            assert torch.equal(a, b), name

    def lines(path):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith("_s") and k != "peak_memory_gb"} for r in records]

    assert lines(tmp_path / "straight-metrics.jsonl") == lines(tmp_path / "interrupted-metrics.jsonl")


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path):
    killed = _setup(tmp_path, name="killed")
    killed.resume()
    killed._log(killed.train_step())  # step 1 logged, no checkpoint yet, then "crash"
    (tmp_path / "killed" / "checkpoints" / ".tmp-step-0000002-99").mkdir(parents=True)  # a save cut short
    again = _setup(tmp_path, name="killed")
    again.fit(progress=False)
    steps = [record["step"] for record in MetricsLog(tmp_path / "killed-metrics.jsonl").read("opsd")]
    assert steps == [1, 2, 3, 4]
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp-*"))


def test_corrupt_checkpoint_is_refused_on_resume(tmp_path):
    trainer = _setup(tmp_path)
    trainer.train_step()
    path = trainer.save()
    (path / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        _setup(tmp_path).resume()
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == [path]


def test_noise_control_touches_only_the_visual_thought(tmp_path):
    trainer = _setup(tmp_path, phase=Phase("noise", noise_vt=True))
    problem = next(trainer.task.train_problems(0))
    teacher = trainer.builder.build(problem).teacher
    noisy = trainer._teacher_context(teacher)
    again = trainer._teacher_context(teacher)
    for original, replaced, second in zip(teacher.segments, noisy.segments, again.segments):
        if original.name == VISUAL_THOUGHT:
            assert isinstance(replaced, ImageSegment) and replaced.pixels is not None
            shape = trainer.backend.preprocess_image(original.image).shape
            assert replaced.pixels.shape == shape
            assert abs(float(replaced.pixels.mean())) < 0.5 and 0.5 < float(replaced.pixels.std()) < 1.5
            assert not torch.equal(replaced.pixels, second.pixels), "noise must be fresh each time"
        else:
            assert replaced is original
    student = trainer.builder.build(problem).student
    with pytest.raises(ValueError, match="visual_thought"):
        with_noise_visual_thought(student, trainer.backend, None)


def test_shuffled_control_shows_each_teacher_another_problems_visual_thought(tmp_path):
    trainer = _setup(tmp_path, "train.grad_accum=2", phase=Phase("shuffled", shuffled_vt=True))
    built = []
    build = trainer.builder.build
    trainer.builder.build = lambda problem, thought=None: built.append((problem, thought)) or build(problem, thought)
    metrics = trainer.train_step()
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["kl"] > 0
    assert len(built) == 8  # the whole step: 2 micro-batches of 4
    own = [problem.visual_thought for problem, _ in built]
    for problem, thought in built:
        assert thought is not problem.visual_thought
        assert any(thought is other for other in own), "a visual thought of the same step"
    # A trainer at the same step (as a resumed one is) pairs the same problems with the same donors.
    again = _setup(tmp_path, "train.grad_accum=2", phase=Phase("shuffled", shuffled_vt=True), name="again")
    pairs = [(problem, donor) for _, problems, donors in again._step_problems() for problem, donor in zip(problems, donors)]
    for (problem, thought), (same_problem, donor) in zip(built, pairs):
        assert problem.id == same_problem.id and torch.equal(thought, donor.visual_thought)


def test_sft_control_trains_on_reference_traces(tmp_path):
    trainer = _setup(tmp_path, phase=Phase("sft", sft=True))
    seen = []
    logits = trainer.backend.completion_logits
    trainer.backend.completion_logits = lambda model, contexts, batch: seen.append(batch) or logits(model, contexts, batch)
    metrics = trainer.train_step()
    assert metrics["loss"] > 0 and "kl" not in metrics
    assert torch.isfinite(torch.tensor(metrics["grad_norm"]))
    problems = [trainer.task.problem(trainer.config.run.seed, i) for i in range(trainer.config.train.samples_per_step)]
    assert seen[0].token_lists() == [trainer.backend.encode(problem.reference_trace) for problem in problems]


def test_sft_control_without_traces_is_refused_in_one_line(tmp_path):
    trainer = _setup(tmp_path, phase=Phase("sft", sft=True))
    problems = trainer.task.train_problems
    trainer.task.train_problems = lambda seed, start=0: (replace(p, reference_trace=None) for p in problems(seed, start))
    with pytest.raises(ConfigError) as error:
        trainer.train_step()
    assert str(error.value).startswith("experiment.sft_control: problem 'train-0-0' of task 'frozen-lake' has no reference trace")
    assert "\n" not in str(error.value)


def test_sft_control_trains_no_eos_after_a_trace_it_cuts(tmp_path):
    whole = _setup(tmp_path, "sampling.max_completion_tokens=40", phase=Phase("sft", sft=True), name="whole")
    cut = _setup(tmp_path, "sampling.max_completion_tokens=2", phase=Phase("sft", sft=True), name="cut")
    masks = []
    for trainer in (whole, cut):
        logits = trainer.backend.completion_logits

        def recording(model, contexts, batch, logits=logits):
            rows = logits(model, contexts, batch)
            masks.append((batch, rows))
            return rows

        trainer.backend.completion_logits = recording
        loss = trainer.train_step()["loss"]
    (whole_batch, _), (cut_batch, cut_rows) = masks
    assert bool(whole_batch.finished.all()) and not bool(cut_batch.finished.any())
    assert cut_batch.tokens.shape[1] == 2
    # The cut run's loss covers its two trace tokens only, not an EOS after them.
    log_probs = torch.log_softmax(cut_rows.logits[:, :2].detach().float(), dim=-1)
    expected = -log_probs.gather(-1, cut_batch.tokens.unsqueeze(-1)).mean()
    assert loss == pytest.approx(float(expected), rel=1e-5)


def test_forward_cap_cuts_completions_to_fit_the_teacher(tmp_path):
    trainer = _setup(tmp_path)
    problems = list(trainer.task.eval_problems(3))
    pairs = [trainer.builder.build(p) for p in problems]
    teachers = [p.teacher for p in pairs]
    length = trainer.backend.context_length(teachers[0])
    trainer.config.sampling.max_forward_tokens = length + 4
    completions = trainer.sampler.sample(trainer.student, [p.student for p in pairs])
    cut = trainer._fit_forward_cap(teachers, completions)
    assert int(cut.lengths.max()) <= 3
    trainer.config.sampling.max_forward_tokens = length + 1
    with pytest.raises(Exception, match="max_forward_tokens"):
        trainer._fit_forward_cap(teachers, completions)


def test_a_problems_sampling_seed_does_not_depend_on_the_rank_that_samples_it(tmp_path):
    from opsd_core.runtime import Ranks

    def timings():
        return {"visual_thought_s": 0.0, "sample_s": 0.0, "teacher_s": 0.0, "student_s": 0.0}

    single = _setup(tmp_path, "train.samples_per_step=4", name="one")
    first = single._prepare_micro_batch(*single._step_problems()[0], timings())
    second = single._prepare_micro_batch(*single._step_problems()[0], timings())
    split = []
    for rank in range(2):
        trainer = _setup(tmp_path, "train.samples_per_step=4", name=f"rank{rank}")
        trainer.ranks = Ranks(rank=rank, world_size=2)
        problems, _, _, seeds = trainer._prepare_micro_batch(*trainer._step_problems()[0], timings())
        assert [p.id for p in problems] == [p.id for p in first[0][2 * rank : 2 * rank + 2]]
        split += seeds
    assert split == first[3]
    assert len(set(first[3] + second[3])) == 8  # every place in the stream has its own seed


class _Poisoned:
    """The run's divergence, with NaN losses from the first call."""

    def __init__(self, divergence):
        self.divergence = divergence
        self.uses_hidden_states = False

    def per_token(self, student_logits, teacher_logits, mask=None):
        return self.divergence.per_token(student_logits, teacher_logits, mask) * float("nan")


def test_a_non_finite_step_stops_the_run_and_is_recorded(tmp_path):
    trainer = _setup(tmp_path)
    trainer.divergence = _Poisoned(trainer.divergence)
    before = {name: p.detach().clone() for name, p in trainer.student.named_parameters()}
    with pytest.raises(NonFiniteError, match="phase 'opsd', step 1: loss nan"):
        trainer.fit(progress=False)
    assert all(torch.equal(before[name], p) for name, p in trainer.student.named_parameters())
    events = [r for r in MetricsLog(tmp_path / "run-metrics.jsonl").read() if r.get("event") == "non-finite"]
    assert [(e["step"], e["action"]) for e in events] == [(1, "stop")]
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_a_non_finite_step_can_be_skipped(tmp_path):
    trainer = _setup(tmp_path, "train.on_non_finite='skip'", "schedule.total_steps=2", "train.checkpoint_every=0")
    trainer.divergence = _Poisoned(trainer.divergence)
    before = {name: p.detach().clone() for name, p in trainer.student.named_parameters()}
    teacher = {name: p.detach().clone() for name, p in trainer.teacher.named_parameters()}
    trainer.fit(progress=False)
    assert trainer.step == 2
    assert all(torch.equal(before[name], p) for name, p in trainer.student.named_parameters())
    assert all(torch.equal(teacher[name], p) for name, p in trainer.teacher.named_parameters())
    records = MetricsLog(tmp_path / "run-metrics.jsonl").read()
    assert [(r["step"], r["action"]) for r in records if r.get("event")] == [(1, "skip"), (2, "skip")]
