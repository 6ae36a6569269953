"""The per-token KL analysis: which rows of the student's own completions carry the KL
diagnostic's KL(teacher || student).

Owns: breaking the diagnostic's draws down by the row's token (vocabulary item), its position
in the completion (equal-width buckets), the token's class where the task defines classes, and
the student's entropy at the row (equal-count quantile buckets; the top one holds the
high-entropy "forking" rows), each with its rows, mean KL and share of the total KL; writing
that as ``per_token.json``, ``per_token.md`` and ``per_token.png``.
Does not know: how the draws were made (that is :func:`~opsd_core.diagnostics.kl.on_policy_draws`,
whose rows these are: the analysis' total over its rows is the diagnostic's KL sum), or models.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from opsd_core.diagnostics.report import format_markdown, format_number
from opsd_core.diagnostics.rows import END_OF_COMPLETION, RowScores
from opsd_core.interfaces import Backend, Task
from opsd_core.rundir import write_atomic
from opsd_core.types import CompletionBatch

ENTROPY_BUCKETS = 5  # quintiles: the top one is the top 20 % of rows by student entropy
POSITION_BUCKETS = 8
END_CLASS = "end of completion"
UNCLASSED = "unclassified"
TOKENS_SHOWN = 20  # rows of the by-token table in per_token.md (per_token.json has them all)
FILES = ("per_token.json", "per_token.md", "per_token.png")


def _flat_rows(draws: Iterable[tuple[CompletionBatch, RowScores]]) -> dict[str, torch.Tensor]:
    """The loss rows of every sample, flattened (R rows): ``token`` int64 (R,), the id of the
    completion token the row predicts, -1 for the row that predicts the end; ``position`` int64
    (R,), the row's place in its completion (0 = first token); ``kl`` and ``entropy`` float64 (R,)."""
    tokens, positions, kls, entropies = [], [], [], []
    for completions, scores in draws:
        if scores.entropy is None:
            raise ValueError("the per-token analysis needs the student's entropy: draw with entropy=True")
        mask = scores.mask.cpu()
        batch, width = mask.shape
        row_tokens = torch.full((batch, width), -1, dtype=torch.int64)
        row_tokens[:, : width - 1] = completions.tokens.cpu()
        row_tokens[torch.arange(batch), completions.lengths.cpu()] = -1  # the row that predicts the end
        tokens.append(row_tokens[mask])
        positions.append(torch.arange(width).expand(batch, width)[mask])
        kls.append(scores.kl.cpu().double()[mask])
        entropies.append(scores.entropy.cpu().double()[mask])
    empty = torch.zeros(0, dtype=torch.float64)
    return {
        "token": torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.int64),
        "position": torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64),
        "kl": torch.cat(kls) if kls else empty,
        "entropy": torch.cat(entropies) if entropies else empty,
    }


def _group(name: str, kl: torch.Tensor, total: float, **extra: Any) -> dict[str, Any]:
    """One table row: ``rows``, ``mean_kl`` (None when empty) and ``share`` of ``total`` (None
    when the total is 0) of the rows whose float64 KLs are ``kl``."""
    summed = float(kl.sum())
    return {
        "name": name,
        **extra,
        "rows": int(kl.numel()),
        "kl_sum": summed,
        "mean_kl": summed / kl.numel() if kl.numel() else None,
        "share": summed / total if total else None,
    }


def per_token_analysis(
    draws: Iterable[tuple[CompletionBatch, RowScores]], backend: Backend, task: Task
) -> dict[str, Any]:
    """The analysis of ``draws`` (from :func:`~opsd_core.diagnostics.kl.on_policy_draws` with
    ``entropy=True``) as JSON-ready figures: ``rows``, ``kl_sum`` and ``mean_kl`` (nats per row,
    the KL diagnostic's figure), and the tables ``by_token`` (largest share first),
    ``by_position``, ``by_class`` (empty when ``task`` defines no token classes) and
    ``by_entropy`` (lowest entropy first), each row holding ``rows``, ``kl_sum``, ``mean_kl`` and
    ``share`` (of ``kl_sum``); ``forking_share``, the share of the KL at the top 20 % of rows by
    the student's entropy."""
    rows = _flat_rows(draws)
    kl, count = rows["kl"], int(rows["kl"].numel())
    total = float(kl.sum())
    token_text = {int(token): backend.decode([int(token)]) for token in rows["token"].unique().tolist() if token >= 0}
    token_text[-1] = END_OF_COMPLETION

    def class_of(token: int) -> str | None:
        return END_CLASS if token < 0 else task.token_class(token_text[token])

    classes = {token: class_of(token) for token in token_text}
    by_token = [
        _group(text, kl[rows["token"] == token], total, token_id=token if token >= 0 else None,
               token_class=classes[token])
        for token, text in token_text.items()
    ]
    by_token.sort(key=lambda group: -group["kl_sum"])

    by_class = []
    if any(name is not None for token, name in classes.items() if token >= 0):
        names = {name or UNCLASSED for name in classes.values()}
        for name in sorted(names, key=lambda name: (name == END_CLASS, name == UNCLASSED, name)):
            members = torch.tensor([token for token, value in classes.items() if (value or UNCLASSED) == name])
            by_class.append(_group(name, kl[torch.isin(rows["token"], members)], total))

    width = max(1, math.ceil((int(rows["position"].max()) + 1) / POSITION_BUCKETS)) if count else 1
    bucket_of_row = rows["position"] // width
    by_position = []
    for bucket in range(int(bucket_of_row.max()) + 1 if count else 0):
        first, last = bucket * width, (bucket + 1) * width - 1
        name = f"{first}" if first == last else f"{first}-{last}"
        by_position.append(_group(name, kl[bucket_of_row == bucket], total, first=first, last=last))

    order = torch.argsort(rows["entropy"], stable=True)
    by_entropy = []
    for bucket in range(ENTROPY_BUCKETS):
        chosen = order[bucket * count // ENTROPY_BUCKETS : (bucket + 1) * count // ENTROPY_BUCKETS]
        entropies = rows["entropy"][chosen]
        low, high = 100 * bucket // ENTROPY_BUCKETS, 100 * (bucket + 1) // ENTROPY_BUCKETS
        by_entropy.append(_group(
            f"{low}-{high}%", kl[chosen], total,
            entropy_min=float(entropies.min()) if len(chosen) else None,
            entropy_max=float(entropies.max()) if len(chosen) else None,
        ))  # fmt: skip
    return {
        "rows": count,
        "kl_sum": total,
        "mean_kl": total / count if count else None,
        "forking_share": by_entropy[-1]["share"],
        "by_token": by_token,
        "by_position": by_position,
        "by_class": by_class,
        "by_entropy": by_entropy,
    }


def _percent(share: float | None) -> float | None:
    return None if share is None else 100 * share


def _table(groups: list[dict[str, Any]], first: str, extra: tuple[tuple[str, str, str], ...] = ()) -> str:
    header = [first, *(title for title, _, _ in extra), "rows", "mean KL", "share of KL"]
    body = [
        [
            group["name"].replace("|", "\\|") or "(empty)",
            *(format_number(group.get(key), pattern) for _, key, pattern in extra),
            str(group["rows"]),
            format_number(group["mean_kl"], "{:.4f}"),
            format_number(_percent(group["share"]), "{:.1f}%"),
        ]
        for group in groups
    ]
    return format_markdown([header, *body])


def per_token_markdown(analysis: dict[str, Any], title: str) -> str:
    """``per_token.md``: the four tables under ``title``."""
    lines = [
        f"# {title}",
        "",
        f"KL(teacher with the VT || student) on {analysis['rows']} rows of the student's own completions: "
        f"{format_number(analysis['mean_kl'], '{:.4f}')} nats per row (the KL diagnostic's figure). A row is "
        f"attributed to the token it predicts; {END_OF_COMPLETION} is the row that predicts the end. The "
        f"top 20 % of rows by the student's entropy (the forking rows) carry "
        f"{format_number(_percent(analysis['forking_share']), '{:.1f}%')} of the KL.",
        "",
        "## By the student's entropy (quantiles of rows, lowest first)",
        "",
        _table(analysis["by_entropy"], "entropy quantile",
               (("entropy from", "entropy_min", "{:.3f}"), ("to", "entropy_max", "{:.3f}"))),
        "",
        "## By position in the completion",
        "",
        _table(analysis["by_position"], "positions"),
        "",
    ]
    if analysis["by_class"]:
        lines += ["## By token class", "", _table(analysis["by_class"], "class"), ""]
    shown = analysis["by_token"][:TOKENS_SHOWN]
    lines += [
        f"## By token ({len(shown)} of {len(analysis['by_token'])} with the largest share)",
        "",
        _table(shown, "token", (("class", "token_class", "{}"),)),
        "",
        "![per-token KL](per_token.png)",
        "",
    ]
    return "\n".join(lines)


def _bars(axis, groups: list[dict[str, Any]], title: str, colour: str) -> None:
    shares = [100 * (group["share"] or 0.0) for group in groups]
    bars = axis.bar(range(len(groups)), shares, color=colour)
    axis.bar_label(bars, fmt="%.0f", fontsize=7)
    axis.set_xticks(range(len(groups)), [group["name"] for group in groups], fontsize=7, rotation=45, ha="right")
    axis.set_ylabel("share of KL (%)")
    axis.set_title(title, fontsize=9)


def write_per_token(directory: Path, analysis: dict[str, Any], title: str) -> list[Path]:
    """``per_token.json`` (the analysis), ``per_token.md`` (its tables) and ``per_token.png``
    (share of the KL by entropy quantile, position, class and top tokens) in ``directory``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path, plot_path = (directory / name for name in FILES)
    write_atomic(json_path, json.dumps({"title": title, **analysis}, indent=2) + "\n")
    write_atomic(markdown_path, per_token_markdown(analysis, title))
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    _bars(axes[0][0], analysis["by_entropy"], "by student entropy quantile (top = forking rows)", "#c63")
    _bars(axes[0][1], analysis["by_position"], "by position in the completion", "#39c")
    if analysis["by_class"]:
        _bars(axes[1][0], analysis["by_class"], "by token class", "#a5c")
    else:
        axes[1][0].set_axis_off()
    _bars(axes[1][1], analysis["by_token"][:12], "by token (largest shares)", "#6a4")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(plot_path, dpi=110)
    plt.close(figure)
    return [json_path, markdown_path, plot_path]
