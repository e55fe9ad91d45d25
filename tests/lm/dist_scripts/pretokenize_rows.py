"""Pretokenisation of in-memory rows with bad images, in chunks, by the processes launched.

Run by tests/lm/test_pretokenize.py with `accelerate launch --multi_gpu --num_processes 2` (gloo on
the CPU); `rows_dataset` is also what the test encodes in one process. Usage:
    pretokenize_rows.py map|stream TOKENIZER OUT_DIR
The source is `rows_dataset()` (PNG bytes, some empty or garbage), as a map-style Dataset or as
an IterableDataset over 3 shards, in chunks of CHUNK_ROWS rows.
"""

from __future__ import annotations

import faulthandler
import io
import signal
import sys

ROWS, BAD, EMPTY, CHUNK_ROWS = 30, (3, 11, 12), (25,), 8


def rows_dataset():  # -> datasets.Dataset
    """ROWS rows: image {bytes, path} (PNG; garbage at BAD, empty at EMPTY), text, id."""
    import datasets

    from vqgpt.data.shapes import ShapesConfig, shapes_dataset

    shapes = shapes_dataset(ShapesConfig(num_images=ROWS, image_size=32))
    raw = []
    for i, image in enumerate(shapes["image"]):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        raw.append(b"not an image" if i in BAD else b"" if i in EMPTY else buf.getvalue())
    features = datasets.Features(
        image=datasets.Image(), text=datasets.Value("string"), id=datasets.Value("int64")
    )
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": b, "path": None} for b in raw],
            "text": shapes["text"],
            "id": list(range(ROWS)),
        },
        features=features,
    )


def source(kind: str):
    """rows_dataset() as given to pretokenize: map-style, or streamed from 3 shards."""
    ds = rows_dataset()
    return ds if kind == "map" else ds.to_iterable_dataset(num_shards=3)


def main() -> None:
    import vqgpt.lm.pretokenize as pretok
    from vqgpt.data.sources import DataConfig
    from vqgpt.distributed import leave_process_group

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the tests' timeout dumps stacks
    kind, tokenizer, out = sys.argv[1:4]
    ds = source(kind)
    pretok.load_image_dataset = lambda cfg, split, stats=None: ds
    cfg = pretok.PretokenizeConfig(
        tokenizer=tokenizer,
        images=DataConfig(source="rows", image_size=32),
        output_dir=out,
        splits=["train"],
        batch_size=4,
        chunk_rows=CHUNK_ROWS,
    )
    result = pretok.pretokenize(cfg)
    print(result.summary(), file=sys.stderr)
    leave_process_group()


if __name__ == "__main__":
    main()
