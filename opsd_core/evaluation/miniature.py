"""Miniature copies of the nine benchmarks' VLMEvalKit TSV files and of the Hugging Face parquet
releases, generated locally.

Owns: writing, under one data root, every file the paper's nine benchmarks (the
``opsd-benchmarks`` plugin's tasks) read, in the release's format (base64 PNG images, list-string multi-image cells, index
back-references, option columns, SAT's option-rotated copies at index + 1e6, ChartQA list
answers, CV-Bench sources, VSP maze maps), with a few synthetic questions each; and the same
questions as the parquet releases :mod:`opsd_core.evaluation.parquet` reads (image structs,
option lists, ``(A)`` / ``(a)`` / index answers, BLINK's subtask configs, sharded and flat
layouts).
Does not know: what a model answers, nor how a benchmark reads or scores its files (the plugin's
tests check that it reads these). The content is meaningless; the format is the point: the
evaluation harness runs end to end on it in tests and in ``opsd eval --data-root`` dry runs.

    python -m opsd_core.evaluation.miniature --out data/benchmarks-mini [--parquet]
"""

from __future__ import annotations

import argparse
import ast
import base64
import csv
import io
import random
from pathlib import Path

from opsd_core.evaluation.scorers import CIRCULAR_OFFSET

# BLINK's subtasks: one row each in BLINK.tsv, one config folder each in the parquet release.
BLINK_SUBTASKS = (
    "Art_Style", "Counting", "Forensic_Detection", "Functional_Correspondence", "IQ_Test", "Jigsaw",
    "Multi-view_Reasoning", "Object_Localization", "Relative_Depth", "Relative_Reflectance",
    "Semantic_Correspondence", "Spatial_Relation", "Visual_Correspondence", "Visual_Similarity",
)

# The instruction line the V* parquet release appends after its options (dropped by the reader).
VSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly."
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


def _mcq_rows(
    rng: random.Random, count: int, options: int = 4, first_index: int = 0, category: str | None = "demo"
) -> list[dict]:
    rows = []
    for i in range(count):
        letters = "ABCD"[:options]
        row = {
            "index": first_index + i,
            "image": _png(rng),
            "question": f"Which option describes picture {i}?",
            "answer": rng.choice(letters),
            "category": category or "",
        }
        row.update({letter: f"option {letter.lower()} {i}" for letter in letters})
        rows.append(row)
    return rows


def _content(n: int, seed: int) -> dict[str, tuple[list[str], list[dict]]]:
    """TSV file name -> (columns, rows) of every benchmark file, the same for a given ``n`` and ``seed``."""
    rng = random.Random(seed)
    files: dict[str, tuple[list[str], list[dict]]] = {}

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
    files["VSP_maze_task_main_original.tsv"] = (["index", "image", "question", "answer", "maze_map", "maze_size"], vsp)

    vispuzzle = _mcq_rows(rng, n)
    for row in vispuzzle:
        row["hint"] = "Compare the pieces."
    files["VisPuzzle.tsv"] = (COLUMNS_MCQ, vispuzzle)

    # BLINK: one row per subtask, the Jigsaw subtask n rows (2 options); two images per row as a
    # list-string cell. BLINK_Jigsaw.tsv holds the Jigsaw rows again, indexed from 0.
    blink = []
    for subtask in BLINK_SUBTASKS:
        rows = _mcq_rows(rng, n if subtask == "Jigsaw" else 1, options=2 if subtask == "Jigsaw" else 4, category=subtask)
        for row in rows:
            row["image"] = str([_png(rng), _png(rng)])
            row["index"] = len(blink)
            blink.append(row)
    files["BLINK.tsv"] = (COLUMNS_MCQ, blink)
    jigsaw = [dict(row, index=i) for i, row in enumerate(r for r in blink if r["category"] == "Jigsaw")]
    files["BLINK_Jigsaw.tsv"] = (COLUMNS_MCQ, jigsaw)

    # SAT: each question plus an option-rotated copy at index + 1e6 (circular evaluation).
    sat = []
    for row in _mcq_rows(rng, n, options=2, category=None):
        sat.append(row)
        rotated = dict(row, index=row["index"] + CIRCULAR_OFFSET, A=row["B"], B=row["A"])
        rotated["answer"] = "B" if row["answer"] == "A" else "A"
        rotated["image"] = str(row["index"])  # back-reference to the original row's image
        sat.append(rotated)
    files["SAT_circular.tsv"] = (COLUMNS_MCQ, sat)

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
        files[name] = (["index", "image", "question", "answer"], chart)

    files["VStarBench.tsv"] = (COLUMNS_MCQ, _mcq_rows(rng, n, category="direct_attributes"))
    files["MMVP.tsv"] = (COLUMNS_MCQ, _mcq_rows(rng, 2 * ((n + 1) // 2), options=2, first_index=1, category=None))

    two_d = _mcq_rows(rng, n)
    for i, row in enumerate(two_d):
        row["source"] = "ADE20K" if i % 2 else "COCO"
    files["CV-Bench-2D.tsv"] = ([*COLUMNS_MCQ, "source"], two_d)
    three_d = _mcq_rows(rng, n, first_index=n)
    for row in three_d:
        row["source"] = "Omni3D"
    files["CV-Bench-3D.tsv"] = ([*COLUMNS_MCQ, "source"], three_d)
    return files


def write_miniature_benchmarks(root: Path, per_benchmark: int = 4, seed: int = 0) -> Path:
    """Write every benchmark's VLMEvalKit TSV file under ``root`` and return ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, (columns, rows) in _content(per_benchmark, seed).items():
        _write(root / name, columns, rows)
    return root


# ---------------------------------------------------------------------------------------------- parquet
def write_miniature_parquet(root: Path, per_benchmark: int = 4, seed: int = 0) -> Path:
    """Write the Hugging Face parquet releases (BLINK with its subtask configs, CV-Bench, MMVP,
    SAT, V*) under ``root`` in the layout of the hub repositories, holding
    the same questions, images and answers as :func:`write_miniature_benchmarks` with the same
    arguments. Returns ``root``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    content = _content(per_benchmark, seed)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

    def save(path: Path, rows: list[dict], types: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        schema = pa.schema([(column, types.get(column, pa.string())) for column in rows[0]])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)

    def picture(cell: str) -> dict:
        return {"bytes": base64.b64decode(cell), "path": None}

    def choices(row: dict) -> list[str]:
        return [row[letter] for letter in "ABCD" if row.get(letter)]

    blink_types = {f"image_{k}": image for k in range(1, 5)} | {"choices": pa.list_(pa.string())}
    for subtask in BLINK_SUBTASKS:
        rows = []
        for k, row in enumerate(r for r in content["BLINK.tsv"][1] if r["category"] == subtask):
            cells = ast.literal_eval(row["image"])
            rows.append(
                {"idx": f"val_{subtask}_{k + 1}", "sub_task": subtask, "question": row["question"]}
                | {f"image_{j + 1}": picture(cells[j]) if j < len(cells) else None for j in range(4)}
                | {"choices": choices(row), "answer": f"({row['answer']})", "prompt": row["question"]}
            )
        save(root / "BLINK" / subtask / "val-00000-of-00001.parquet", rows, blink_types)

    cv_types = {"idx": pa.int64(), "image": image, "choices": pa.list_(pa.string())}
    for shard, name in enumerate(("CV-Bench-2D.tsv", "CV-Bench-3D.tsv")):
        rows = [
            {
                "idx": row["index"], "type": name[9:11], "task": row["category"], "source": row["source"],
                "image": picture(row["image"]), "question": row["question"], "choices": choices(row),
                "answer": f"({row['answer']})", "prompt": row["question"],
            }
            for row in content[name][1]
        ]
        save(root / "CV-Bench" / "data" / f"test-0000{shard}-of-00002.parquet", rows, cv_types)

    mmvp = [
        {
            "Index": row["index"], "Question": row["question"],
            "Options": " ".join(f"({letter.lower()}) {text}" for letter, text in zip("AB", choices(row))),
            "Correct Answer": f"({row['answer'].lower()})", "image": picture(row["image"]),
        }
        for row in content["MMVP.tsv"][1]
    ]
    save(root / "MMVP" / "train-00000-of-00001.parquet", mmvp, {"Index": pa.int64(), "image": image})

    sat = [
        {
            "image_bytes": [base64.b64decode(row["image"])], "question": row["question"], "answers": choices(row),
            "correct_answer_idx": "AB".index(row["answer"]),
        }
        for row in content["SAT_circular.tsv"][1]
        if row["index"] < CIRCULAR_OFFSET
    ]
    sat_types = {"image_bytes": pa.list_(pa.binary()), "answers": pa.list_(pa.string()), "correct_answer_idx": pa.int64()}
    save(root / "SAT" / "data" / "test-00000-of-00001.parquet", sat, sat_types)

    vstar = [
        {
            "image": picture(row["image"]),
            "text": "\n".join([row["question"], *(f"({letter}) {row[letter]}" for letter in "ABCD"), VSTAR_INSTRUCTION]),
            "label": row["answer"], "category": row["category"], "question_id": f"sa_{row['index']}",
        }
        for row in content["VStarBench.tsv"][1]
    ]
    save(root / "vstar-bench" / "data" / "test-00000-of-00001.parquet", vstar, {"image": image})
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--per-benchmark", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parquet", action="store_true", help="Write the parquet releases instead of the TSV files.")
    args = parser.parse_args()
    if args.parquet:
        write_miniature_parquet(args.out, args.per_benchmark, args.seed)
        print(f"wrote the parquet releases under {args.out}")
    else:
        write_miniature_benchmarks(args.out, args.per_benchmark, args.seed)
        print(f"wrote the nine benchmarks' files under {args.out}")


if __name__ == "__main__":
    main()
