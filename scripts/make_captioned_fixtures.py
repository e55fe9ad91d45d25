"""Build tests/fixtures/captioned/: ~30 real photographs with captions, in every data format.

The photographs ship inside wheels: scikit-image (skimage/data), scikit-learn
(sklearn/datasets/images: china.jpg, flower.jpg, CC BY 2.0) and matplotlib
(mpl-data/sample_data/grace_hopper.jpg, public domain). scikit-learn and matplotlib are found
without importing them (install them anywhere on sys.path, e.g. `pip install --no-deps --target
/tmp/wheels scikit-learn matplotlib` and PYTHONPATH=/tmp/wheels). Each photo (and a few crops of
the larger ones) is resized so that its longest side is 96 px; captions were written by looking at
the images. The output is committed: the tests need none of these packages.

    python scripts/make_captioned_fixtures.py [--out tests/fixtures/captioned]

Writes folder/ (images + metadata.jsonl), csv_folder/ (metadata.csv naming ../folder/ images),
parquet/ (2 files: an HF Image column `image` {bytes, path}, `caption`, `name`), webdataset/
({00000..00002}.tar: key.jpg|png + key.txt + key.json {caption, name, width, height}; the last
shard has no .txt, its captions are in the JSON only) and broken/00000.tar (a corrupt JPEG, a
zero-byte member, text in a .jpg, an image without a caption, a key without an image).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import shutil
import tarfile
from pathlib import Path

from PIL import Image

MAX_SIDE = 96
SHARDS = 3

# (package, file in its data folder, crop box or None, caption)
PHOTOS = [
    ("skimage", "astronaut.png", None, "an astronaut in an orange suit in front of a flag"),
    ("skimage", "astronaut.png", (150, 0, 350, 200), "the smiling face of an astronaut"),
    ("skimage", "coffee.png", None, "a cup of coffee on a saucer with a spoon"),
    ("skimage", "rocket.jpg", None, "a rocket on a launch pad under a blue sky"),
    ("skimage", "hubble_deep_field.jpg", None, "galaxies in deep space"),
    ("skimage", "hubble_deep_field.jpg", (0, 0, 300, 300), "a few bright galaxies in the dark"),
    ("skimage", "camera.png", None, "a black and white photo of a man with a camera"),
    ("skimage", "coins.png", None, "a grey photo of old coins in rows"),
    ("skimage", "coins.png", (0, 0, 150, 150), "a few old coins"),
    ("skimage", "moon.png", None, "the grey surface of the moon"),
    ("skimage", "brick.png", None, "a grey brick wall"),
    ("skimage", "grass.png", None, "a close-up of grass"),
    ("skimage", "gravel.png", None, "grey gravel on the ground"),
    ("skimage", "chelsea.png", None, "a ginger cat"),
    ("skimage", "chelsea.png", (100, 0, 350, 250), "the face of a ginger cat"),
    ("skimage", "ihc.png", None, "stained tissue under a microscope"),
    ("skimage", "retina.jpg", None, "the back of a human eye"),
    ("skimage", "retina.jpg", (400, 400, 1000, 1000), "blood vessels of a retina"),
    ("skimage", "clock_motion.png", None, "a wall clock blurred by motion"),
    ("skimage", "cell.png", None, "a grey microscope image of a cell"),
    ("skimage", "horse.png", None, "the black silhouette of a horse"),
    ("skimage", "page.png", None, "a scanned page of printed text"),
    ("skimage", "microaneurysms.png", None, "a grey close-up of a retina"),
    ("sklearn", "china.jpg", None, "a chinese pagoda among trees"),
    ("sklearn", "china.jpg", (0, 0, 320, 240), "a chinese pagoda"),
    ("sklearn", "flower.jpg", None, "an orange dahlia"),
    ("sklearn", "flower.jpg", (160, 100, 480, 380), "the petals of an orange dahlia"),
    ("matplotlib", "grace_hopper.jpg", None, "a woman in a navy uniform"),
    ("matplotlib", "grace_hopper.jpg", (100, 50, 420, 370), "the face of a woman in uniform"),
    ("skimage", "rocket.jpg", (220, 0, 420, 427), "a white rocket"),
]
DATA_FOLDERS = {
    "skimage": "data",
    "sklearn": "datasets/images",
    "matplotlib": "mpl-data/sample_data",
}
ATTRIBUTION = """\
Photographs from the data folders of wheels vqgpt's tests may redistribute them from:
scikit-image (BSD-3-Clause; skimage/data: see skimage.data's docstrings for each image's
source, public domain or CC0 except retina.jpg, CC BY 4.0, Häggström M.), scikit-learn
(china.jpg, flower.jpg: CC BY 2.0, danielbuechele / vultilion on Flickr) and matplotlib
(grace_hopper.jpg: public domain, US Navy). Resized to at most 96 px; built by
scripts/make_captioned_fixtures.py.
"""


def data_folder(package: str) -> Path:
    """A package's data folder, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed: pip install --no-deps {package}")
    return Path(next(iter(spec.submodule_search_locations))) / DATA_FOLDERS[package]


def small(package: str, name: str, box) -> tuple[Image.Image, str]:
    """The photo (cropped to box) with its longest side at most MAX_SIDE; its fixture suffix."""
    image = Image.open(data_folder(package) / name)
    image.load()
    if box is not None:
        image = image.crop(box)
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    if image.mode in ("RGBA", "LA", "P"):
        return image, "png"  # keeps its alpha: the loaders composite it on white
    return image.convert("RGB") if image.mode not in ("RGB", "L") else image, "jpg"


def encode(image: Image.Image, suffix: str) -> bytes:
    buf = io.BytesIO()
    if suffix == "png":
        image.save(buf, format="PNG", optimize=True)
    else:
        image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # byte-identical rebuilds
    tar.addfile(info, io.BytesIO(data))


def build(out: Path) -> None:
    import datasets

    shutil.rmtree(out, ignore_errors=True)
    for sub in ("folder", "csv_folder", "parquet", "webdataset", "broken"):
        (out / sub).mkdir(parents=True)
    (out / "ATTRIBUTION.txt").write_text(ATTRIBUTION)
    rows = []  # (key, file name, bytes, caption, width, height)
    for i, (package, name, box, caption) in enumerate(PHOTOS):
        image, suffix = small(package, name, box)
        key = f"{i:06d}"
        rows.append((key, f"{key}.{suffix}", encode(image, suffix), caption, *image.size))

    lines, csv_lines = [], ["file_name,text"]
    for _, file_name, data, caption, *_ in rows:
        (out / "folder" / file_name).write_bytes(data)
        lines.append(json.dumps({"file_name": file_name, "text": caption}))
        csv_lines.append(f'../folder/{file_name},"{caption}"')
    (out / "folder" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (out / "csv_folder" / "metadata.csv").write_text("\n".join(csv_lines) + "\n")

    features = datasets.Features(
        image=datasets.Image(), caption=datasets.Value("string"), name=datasets.Value("string")
    )
    half = len(rows) // 2
    for part, chunk in enumerate((rows[:half], rows[half:])):
        table = {
            "image": [{"bytes": r[2], "path": r[1]} for r in chunk],
            "caption": [r[3] for r in chunk],
            "name": [r[1] for r in chunk],
        }
        ds = datasets.Dataset.from_dict(table, features=features)
        ds.to_parquet(str(out / "parquet" / f"part-{part}.parquet"))

    per_shard = -(-len(rows) // SHARDS)
    for shard in range(SHARDS):
        with tarfile.open(
            out / "webdataset" / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT
        ) as tar:
            for key, file_name, data, caption, w, h in rows[
                shard * per_shard : (shard + 1) * per_shard
            ]:
                add_member(tar, file_name, data)
                if shard < SHARDS - 1:  # the last shard: captions in the JSON only
                    add_member(tar, f"{key}.txt", caption.encode())
                meta = {"caption": caption, "name": file_name, "width": w, "height": h}
                add_member(tar, f"{key}.json", json.dumps(meta).encode())

    good = rows[0][2]
    with tarfile.open(out / "broken" / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        members = [
            ("a_good.jpg", good), ("a_good.txt", b"a good photo"),
            ("b_corrupt.jpg", good[: len(good) // 3]), ("b_corrupt.txt", b"a cut jpeg"),
            ("c_empty.jpg", b""), ("c_empty.txt", b"no bytes"),
            ("d_text.jpg", b"this is not a jpeg"), ("d_text.txt", b"text in a jpg"),
            ("e_uncaptioned.jpg", rows[1][2]),
            ("f_no_image.txt", b"a caption without an image"),
            ("g_good.jpg", rows[2][2]), ("g_good.txt", b"another good photo"),
        ]  # fmt: skip
        for name, data in members:
            add_member(tar, name, data)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {len(rows)} photos in 5 formats to {out}: {total / 1024:.0f} KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--out", type=Path, default=root / "tests" / "fixtures" / "captioned")
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
