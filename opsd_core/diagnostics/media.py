"""Media records: a fixed set of problems with the student's completion, the VT the teacher
saw, and where along the completion the teacher and the student disagree.

Owns: greedy-decoding the student in the student context, scoring the same completion rows in
the teacher context (the problem's own visual thought) and the student context, the per-token
KL(teacher || student) of each row, and rendering the records as one self-contained HTML page
(tokens coloured by KL, VT images inlined).
Does not know: loggers or training; the caller picks the models (the current EMA teacher
during training, the start checkpoint for the report's before/after gallery) and where the
page goes.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

import torch

from opsd_core.diagnostics.rows import END_OF_COMPLETION, evaluating, score_rows
from opsd_core.evaluation.evaluate import contexts_for
from opsd_core.images import to_pil
from opsd_core.interfaces import Backend, OnPolicySampler, Task
from opsd_core.interfaces.logger import MediaSample
from opsd_core.types import Problem


@torch.no_grad()
def media_samples(
    backend: Backend,
    task: Task,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    problems: Sequence[Problem],
    sampler: OnPolicySampler,
) -> list[MediaSample]:
    """One record per problem: ``student``'s completion by the greedy ``sampler`` (the run's
    evaluation sampler) and, at each of its rows, KL(p of ``teacher`` in the teacher context || p
    of ``student`` in the student context), nats. The last row (the one that predicts the end)
    is shown as ``END_OF_COMPLETION``."""
    if not problems:
        return []
    with evaluating(student, teacher):
        students = contexts_for("student", backend, problems)
        teachers = contexts_for("teacher", backend, problems)
        completions = sampler.sample(student, students)
        per_row = score_rows(backend, teacher, student, teachers, students, completions).kl  # (B, N + 1)
    samples = []
    for row, (problem, tokens) in enumerate(zip(problems, completions.token_lists())):
        response = backend.decode(tokens)
        pieces = tuple(backend.decode([token]) for token in tokens) + (END_OF_COMPLETION,)
        samples.append(
            MediaSample(
                problem_id=str(problem.id),
                tokens=pieces,
                token_kl=tuple(float(value) for value in per_row[row, : len(pieces)].tolist()),
                visual_thought=problem.visual_thought,
                correct=bool(task.score(problem, response).correct),
            )
        )
    return samples


def image_data_uri(image) -> str:
    """A PNG ``data:`` URI of ``image`` (PIL, or float32 (3, H, W) in [0, 1])."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _token_spans(sample: MediaSample, scale: float) -> str:
    spans = []
    for token, kl in zip(sample.tokens, sample.token_kl):
        strength = min(kl / scale, 1.0) if scale > 0 else 0.0
        spans.append(
            f'<span title="KL {kl:.4f}" style="background: rgba(220, 60, 30, {strength:.3f})">'
            f"{html.escape(token)}</span>"
        )
    return "".join(spans)


def render_html(title: str, samples: Sequence[MediaSample]) -> str:
    """One HTML page: per problem its VT, whether the answer was right, its mean KL, and the
    completion with each token's background as red as its KL (the page's largest KL is full red;
    hover a token for its value)."""
    scale = max((kl for sample in samples for kl in sample.token_kl), default=0.0)
    rows = []
    for sample in samples:
        image = (
            f'<img alt="visual thought" style="image-rendering: pixelated; width: 128px" '
            f'src="{image_data_uri(sample.visual_thought)}">'
            if sample.visual_thought is not None
            else ""
        )
        rows.append(
            f"<tr><td>{html.escape(sample.problem_id)}</td><td>{image}</td>"
            f"<td>{'yes' if sample.correct else 'no'}</td><td>{sample.mean_kl:.4f}</td>"
            f'<td style="font-family: monospace; white-space: pre-wrap">{_token_spans(sample, scale)}</td></tr>'
        )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p>Greedy student completions; each token's background is KL(teacher with the visual thought || "
        f"student) at that token, full red = {scale:.4f} nats. {END_OF_COMPLETION} is the row that predicts "
        "the end of the completion.</p>"
        "<table border=\"1\" cellpadding=\"4\"><tr><th>problem</th><th>visual thought</th><th>correct</th>"
        "<th>mean KL</th><th>completion</th></tr>"
        + "".join(rows)
        + "</table></body></html>\n"
    )
