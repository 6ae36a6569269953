"""A miniature dataset in the released ThinkMorph parquet layout, generated locally.

Owns: writing ``<root>/<Task>/data/train-00000-of-00001.parquet`` files whose rows have the
released columns (problem image, question, answer, two thoughts, one visual-thought image), so
that ``opsd run --backend thinkmorph`` can be tried end to end without the real data.
Does not know: models or training. The content is synthetic: a coloured square on a grey
canvas; the question asks where it is; the visual thought is the same canvas with the square
outlined. It exercises the pipeline, it teaches nothing.

    python -m opsd_thinkmorph.demo_data --out data/thinkmorph-demo
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

DATASETS = ("Visual_Search", "Spatial_Navigation", "Jigsaw_Assembly", "Chart_Refocus")
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [
        ("pid", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("problem_image_0", IMAGE),
        ("resoning_thought_0", pa.string()),
        ("reasoning_image_0", IMAGE),
        ("resoning_thought_1", pa.string()),
        ("task", pa.string()),
        ("full_text_only_thought", pa.string()),
    ]
)
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _row(dataset: str, index: int, rng: random.Random, side: int) -> dict:
    quadrant = rng.randrange(4)
    half = side // 2
    box = side // 4
    x0 = (quadrant % 2) * half + rng.randrange(half - box)
    y0 = (quadrant // 2) * half + rng.randrange(half - box)
    canvas = Image.new("RGB", (side, side), (128, 128, 128))
    ImageDraw.Draw(canvas).rectangle([x0, y0, x0 + box, y0 + box], fill=(200, 40, 40))
    thought = canvas.copy()
    ImageDraw.Draw(thought).rectangle([x0 - 2, y0 - 2, x0 + box + 2, y0 + box + 2], outline=(255, 255, 0), width=2)
    letter = "ABCD"[quadrant]
    options = " ".join(f"({'ABCD'[i]}) {name}" for i, name in enumerate(QUADRANTS))
    pid = f"demo-{index:04d}"
    return {
        "pid": pid,
        "question": f"In which part of the image is the red square? {options}",
        "answer": letter,
        "problem_image_0": {"bytes": _png(canvas), "path": f"{pid}.png"},
        "resoning_thought_0": "I should find the red square and mark it.",
        "reasoning_image_0": {"bytes": _png(thought), "path": f"{pid}_vt.png"},
        "resoning_thought_1": f"The marked square is in the {QUADRANTS[quadrant]} part.",
        "task": dataset,
        "full_text_only_thought": f"The red square is in the {QUADRANTS[quadrant]} part.",
    }


def write_demo_dataset(
    root: Path, rows_per_dataset: int = 16, side: int = 64, seed: int = 0, datasets=DATASETS
) -> Path:
    """Write the miniature dataset under ``root`` and return ``root``."""
    rng = random.Random(seed)
    root = Path(root)
    for dataset in datasets:
        rows = [_row(dataset, i, rng, side) for i in range(rows_per_dataset)]
        path = root / dataset / "data" / "train-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, row_group_size=8)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="directory to write the datasets into")
    parser.add_argument("--rows", type=int, default=16, help="rows per dataset")
    parser.add_argument("--side", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = write_demo_dataset(args.out, args.rows, args.side, args.seed)
    print(f"wrote {len(DATASETS)} datasets of {args.rows} rows under {root}")


if __name__ == "__main__":
    main()
