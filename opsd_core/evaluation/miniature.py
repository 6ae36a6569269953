"""Miniature copies of the nine benchmarks' VLMEvalKit TSV files, generated locally.

Owns: writing, under one data root, every file :data:`~opsd_core.evaluation.benchmarks.BENCHMARKS`
names, in the release's format (base64 PNG images, list-string multi-image cells, index
back-references, option columns, SAT's option-rotated copies at index + 1e6, ChartQA list
answers, CV-Bench sources, VSP maze maps), with a few synthetic questions each.
Does not know: what a model answers. The content is meaningless; the format is the point: the
evaluation harness runs end to end on it in tests and in ``opsd eval --data-root`` dry runs.

    python -m opsd_core.evaluation.miniature --out data/benchmarks-mini
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import random
from pathlib import Path

from opsd_core.evaluation.scorers import CIRCULAR_OFFSET

COLUMNS_MCQ = ["index", "image", "question", "A", "B", "C", "D", "answer", "hint", "category"]


def _png(rng: random.Random, side: int = 40) -> str:
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
    x, y = rng.randrange(side // 2), rng.randrange(side // 2)
    ImageDraw.Draw(picture).rectangle([x, y, x + side // 3, y + side // 3], fill=(255, 255, 255))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _write(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({column: row.get(column, "") for column in columns})


def _mcq_rows(rng: random.Random, count: int, options: int = 4, first_index: int = 0, **extra) -> list[dict]:
    rows = []
    for i in range(count):
        letters = "ABCD"[:options]
        row = {
            "index": first_index + i,
            "image": _png(rng),
            "question": f"Which option describes picture {i}?",
            "answer": rng.choice(letters),
            "category": extra.get("category", "demo"),
        }
        row.update({letter: f"option {letter.lower()} {i}" for letter in letters})
        rows.append(row)
    return rows


def write_miniature_benchmarks(root: Path, per_benchmark: int = 4, seed: int = 0) -> Path:
    """Write every benchmark file under ``root`` and return ``root``."""
    rng = random.Random(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n = per_benchmark

    # VSP: a maze map per row; the question carries the image placeholder.
    vsp = []
    for i in range(n):
        grid = [["F"] * 3 for _ in range(3)]
        grid[0][0], grid[2][2], grid[1][1] = "S", "G", "H"
        vsp.append(
            {
                "index": i,
                "image": str([_png(rng)]),
                "question": "<TEST-IMAGE> Find a path from S to G avoiding holes; answer as \\boxed{moves}.",
                "answer": "R,R,D,D",
                "maze_map": str(["".join(row) for row in grid]),
                "maze_size": 3,
            }
        )
    _write(root / "VSP_maze_task_main_original.tsv", ["index", "image", "question", "answer", "maze_map", "maze_size"], vsp)

    _write(root / "VisPuzzle.tsv", COLUMNS_MCQ, _mcq_rows(rng, n))
    _write(root / "BLINK_Jigsaw.tsv", COLUMNS_MCQ, _mcq_rows(rng, n, options=2))

    # SAT: each question plus an option-rotated copy at index + 1e6 (circular evaluation).
    sat = []
    for row in _mcq_rows(rng, n, options=2):
        sat.append(row)
        rotated = dict(row, index=row["index"] + CIRCULAR_OFFSET, A=row["B"], B=row["A"])
        rotated["answer"] = "B" if row["answer"] == "A" else "A"
        rotated["image"] = str(row["index"])  # back-reference to the original row's image
        sat.append(rotated)
    _write(root / "SAT_circular.tsv", COLUMNS_MCQ, sat)

    # BLINK: two images per row as a list-string cell; one row reuses another's images.
    blink = _mcq_rows(rng, n, hint="Compare the two pictures.")
    for row in blink:
        row["image"] = str([_png(rng), _png(rng)])
        row["hint"] = "Compare the two pictures."
    _write(root / "BLINK.tsv", COLUMNS_MCQ, blink)

    for name, offset in (("ChartQA_h_bar.tsv", 0), ("ChartQA_v_bar.tsv", 1000)):
        chart = [
            {
                "index": offset + i,
                "image": _png(rng),
                "question": f"What is the value of bar {i}? Put the answer in <answer></answer>.",
                "answer": str([str(10 * (i + 1))]) if i % 2 else str(10 * (i + 1)),
            }
            for i in range(n)
        ]
        _write(root / name, ["index", "image", "question", "answer"], chart)

    _write(root / "VStarBench.tsv", COLUMNS_MCQ, _mcq_rows(rng, n, category="direct_attributes"))
    _write(root / "MMVP.tsv", COLUMNS_MCQ, _mcq_rows(rng, 2 * ((n + 1) // 2), options=2, first_index=1))

    two_d = _mcq_rows(rng, n)
    for i, row in enumerate(two_d):
        row["source"] = "ADE20K" if i % 2 else "COCO"
    _write(root / "CV-Bench-2D.tsv", [*COLUMNS_MCQ, "source"], two_d)
    three_d = _mcq_rows(rng, n, first_index=10_000)
    for row in three_d:
        row["source"] = "Omni3D"
    _write(root / "CV-Bench-3D.tsv", [*COLUMNS_MCQ, "source"], three_d)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--per-benchmark", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_miniature_benchmarks(args.out, args.per_benchmark, args.seed)
    print(f"wrote the nine benchmarks' files under {args.out}")


if __name__ == "__main__":
    main()
