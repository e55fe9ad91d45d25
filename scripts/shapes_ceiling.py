"""How well the shapes checker reads a tokenizer's own reconstructions, per (size, shape).

The text-to-image ceiling: a perfect LM writes exactly the codes of the true image, so its images
are these reconstructions. Prints a table.

    python scripts/shapes_ceiling.py --tokenizer runs/demo/tokenizer --data runs/demo/data/test
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from vqgpt.data.shapes import parse_caption
from vqgpt.eval.shape_checker import read_objects, t2i_scores
from vqgpt.tokenizer.codec import load_tokenizer_model, reconstruct_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a tokenizer run (or its final/)")
    parser.add_argument("--data", required=True, help="a shapes image folder with metadata.jsonl")
    parser.add_argument("--num-images", type=int, default=500)
    args = parser.parse_args()

    folder = Path(args.data)
    lines = (folder / "metadata.jsonl").read_text().splitlines()[: args.num_images]
    rows = [json.loads(line) for line in lines]
    images = [Image.open(folder / r["file_name"]).convert("RGB") for r in rows]
    recon = reconstruct_images(load_tokenizer_model(args.tokenizer), images)
    texts = [r["text"] for r in rows]
    print(
        f"all objects right: originals {t2i_scores(texts, images).accuracy:.1%}, "
        f"reconstructions {t2i_scores(texts, recon).accuracy:.1%} ({len(rows)} images)"
    )
    hits: dict[tuple[str, str], list[int]] = {}
    for text, image in zip(texts, recon, strict=True):
        found = {o.position: o for o in read_objects(image)}
        for obj in parse_caption(text):
            seen = found.get(obj.position)
            tally = hits.setdefault((obj.size, obj.shape), [0, 0])
            tally[0] += int(seen is not None and seen.shape == obj.shape)
            tally[1] += 1
    print("| size | shape | shape read right after encode + decode |")
    print("|---|---|---|")
    for (size, shape), (ok, n) in sorted(hits.items()):
        print(f"| {size} | {shape} | {ok}/{n} = {ok / n:.0%} |")


if __name__ == "__main__":
    main()
