"""Diagnosis of a photos tokenizer: held-out PSNR per photograph, on both splits.

    python scripts/photos_per_photo.py runs/photos/tokenizer/final
    python scripts/photos_per_photo.py RUN/final --bypass   # the autoencoder without its quantizer

The photos source (`data.source: photos`) crops 11 training photographs and 4 held-out ones
(`TRAIN_PHOTOS`, `TEST_PHOTOS`; each crop's caption names its photograph). This script
draws `--num-images` crops of each split (the recipe's seed, so the test crops are the ones the
training run evaluated on) and prints a Markdown table: mean PSNR (dB, per image, as
`ReconstructionMeter`) per photograph, per split, and each split's codebook usage.

Two questions it answers: is the held-out score limited by the held-out photographs being unlike
the training ones (then training crops reconstruct much better than held-out ones), and how much
of the loss is the quantizer's (`--bypass` decodes the encoder output itself, as the bypass
warm-up does: the same network's ceiling; only meaningful for a run trained that way, e.g.
`quantizer.bypass_steps` above `train.max_steps`: a normally trained decoder never learnt it).
"""

from __future__ import annotations

import argparse

import torch

from vqgpt.data.images import ImageTransform
from vqgpt.data.sources import TEST_PHOTOS, TRAIN_PHOTOS, PhotosConfig, photos_dataset
from vqgpt.tokenizer.codec import load_tokenizer_model
from vqgpt.tokenizer.metrics import CodebookUsage, psnr


@torch.no_grad()
def per_photo(model, split: str, num_images: int, bypass: bool, batch_size: int = 100):
    """({photo: mean PSNR dB}, mean PSNR dB, usage fraction) of `num_images` crops of `split`."""
    photos = TRAIN_PHOTOS if split == "train" else TEST_PHOTOS
    name_of = {f"a photo of {text}": name for name, text in photos.items()}  # caption -> photo
    cfg = PhotosConfig(num_images=num_images, num_test_images=num_images)
    size = model.config.arch.image_size
    crops = photos_dataset(cfg, split, size)
    transform = ImageTransform(size)
    pixels = torch.stack([transform(im.convert("RGB")) for im in crops["image"]])  # (N, 3, H, W)
    usage, scores = CodebookUsage(model.codebook_size), []
    for batch in pixels.split(batch_size):
        codes = model.encode(batch)
        usage.update(codes)
        recon = (
            model(batch, bypass_quantizer=True).reconstruction if bypass else model.decode(codes)
        )
        scores.append(psnr(batch, recon))
    scores = torch.cat(scores)  # (N,) dB
    names = [name_of[text] for text in crops["text"]]  # each crop's photograph
    by_photo = {
        n: float(scores[[i for i, m in enumerate(names) if m == n]].mean())
        for n in sorted(set(names))
    }
    return by_photo, float(scores.mean()), usage.compute().usage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizer", help="a tokenizer folder (RUN/final)")
    parser.add_argument("--num-images", type=int, default=500, help="crops per split")
    parser.add_argument("--bypass", action="store_true", help="decode z_e (no quantizer)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_tokenizer_model(args.tokenizer).eval()
    print(f"| split | photo | PSNR (dB){' (bypass)' if args.bypass else ''} |\n|---|---|---|")
    for split in ("train", "test"):
        by_photo, mean, usage = per_photo(model, split, args.num_images, args.bypass)
        for name, value in by_photo.items():
            print(f"| {split} | {name} | {value:.2f} |")
        print(f"| {split} | **all** (usage {100 * usage:.1f}%) | **{mean:.2f}** |")


if __name__ == "__main__":
    main()
