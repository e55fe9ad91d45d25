"""Benchmark: text-to-image sampling, HF `generate` vs vqgpt's plain path vs its fast path.

    python scripts/bench_sampling.py            # CUDA: GPT-2 small, K=16,384, 16x16 = 256 tokens
    python scripts/bench_sampling.py --size cpu # CPU: GPT-2 mini, K=1024, 8x8 tokens, 1 and 8
    python scripts/bench_sampling.py --quick    # CPU smoke run: tiny GPT-2, K=256, 4x4 tokens

Random weights (timing only), float32, sampling with CFG (scale 3), 1 and N images; every
prompt is `eos caption boi` with an 8-token random caption. Rows:
  HF generate   `model.generate` with its KV cache, a logits processor that keeps image ids only,
                and HF's CFG (`guidance_scale` + `negative_prompt_ids`: a second, unbatched
                forward per step for the unconditional branch)
  vqgpt plain   `vqgpt.lm.generate.ImageSampler(cache="dynamic")`: DynamicCache, CFG rows in the
                same batch
  vqgpt fast    `ImageSampler(cache="static")`: StaticCache, a compiled step (CUDA graphs on CUDA;
                no compile on the CPU)
Time: best of --repeats after one warm-up call (the fast path's first call, which compiles, is
reported separately). "= plain": % of images (and tokens) the fast path draws identically to the
plain path for the same seed.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from transformers import LogitsProcessor

from vqgpt.lm.decoding import left_pad
from vqgpt.lm.generate import ImageSampler, generate_image_codes
from vqgpt.lm.model import LMConfig, build_lm
from vqgpt.lm.sampling import SamplingConfig, image_token_mask
from vqgpt.lm.vocab import VocabLayout

SIZES = {  # --size: model preset, codebook size K, grid side, the larger image count, device
    "quick": dict(preset="tiny", codebook_size=256, grid=4, images=4, device="cpu"),
    "cpu": dict(preset="mini", codebook_size=1024, grid=8, images=8, device="cpu"),
    "gpu": dict(preset="small", codebook_size=16_384, grid=16, images=64, device="cuda"),
}
CAPTION_LEN = 8
CFG_SCALE = 3.0


class ImageTokensOnly(LogitsProcessor):
    """HF logits processor: -inf outside the image-code ids."""

    def __init__(self, allowed: torch.Tensor) -> None:
        self.allowed = allowed

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(~self.allowed, float("-inf"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float, object]:
    """(first call seconds, best of `repeats` later calls, last result)."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return first, best, out


def hf_generate(model, layout: VocabLayout, prompts: list[list[int]], seed: int) -> torch.Tensor:
    """Image codes [B, h*w] through `model.generate` with HF's own CFG."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, layout.eos_id, device)
    uncond, uncond_mask = left_pad([[layout.eos_id, layout.boi_id]] * len(prompts), 0, device)
    allowed = image_token_mask(layout, model.config.vocab_size, device)
    torch.manual_seed(seed)
    n = layout.tokens_per_image
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=True,
            top_k=0,
            guidance_scale=CFG_SCALE,
            negative_prompt_ids=uncond,
            negative_prompt_attention_mask=uncond_mask,
            logits_processor=[ImageTokensOnly(allowed)],
            pad_token_id=layout.eos_id,
            use_cache=True,
        )
    return out[:, ids.shape[1] :] - layout.image_offset


def bench(
    preset: str, codebook_size: int, grid: int, image_counts: list[int], repeats: int, device: str
) -> list[str]:
    """Markdown rows: one per (images, method)."""
    layout = VocabLayout(codebook_size=codebook_size, grid=(grid, grid))
    torch.manual_seed(0)
    model = build_lm(LMConfig(preset=preset), layout.vocab_size, layout.tokens_per_image + 16)
    model = model.to(device).eval()
    dev = torch.device(device)
    sampler = ImageSampler(model, layout, cache="static")  # compiles on CUDA only
    rows = []
    for n in image_counts:
        g = torch.Generator().manual_seed(n)
        captions = torch.randint(0, layout.text_vocab_size - 1, (n, CAPTION_LEN), generator=g)
        captions = captions.tolist()
        prompts = [[layout.eos_id, *c, layout.boi_id] for c in captions]
        sampling = SamplingConfig(seed=0, cfg_scale=CFG_SCALE, batch_size=n)
        hf = timed(partial(hf_generate, model, layout, prompts, 0), dev, repeats)
        plain = timed(
            partial(generate_image_codes, model, layout, captions, sampling), dev, repeats
        )
        fast = timed(partial(sampler, captions, sampling), dev, repeats)
        same = plain[2].flatten(1) == fast[2].flatten(1)  # (n, h*w)
        tokens = n * layout.tokens_per_image
        results = {"HF generate": hf, "vqgpt plain": plain, "vqgpt fast": fast}
        for name, (first, best, _) in results.items():
            agree = ""
            if name == "vqgpt fast":
                images = 100 * same.all(dim=1).float().mean().item()
                agree = f"{images:.0f}% images, {100 * same.float().mean().item():.2f}% tokens"
            rows.append(
                f"| {n} | {name} | {best:.3f} | {tokens / best:.0f} | {hf[1] / best:.2f}x "
                f"| {first:.2f} | {agree} |"
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, measure, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="gpu", help="problem size")
    parser.add_argument("--quick", action="store_true", help="same as --size quick (seconds)")
    parser.add_argument("--images", type=int, default=None, help="the larger batch (and 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls after a warm-up")
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else args.size]
    device = size["device"]
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("the full benchmark needs CUDA; use --quick on the CPU")
    repeats = args.repeats or (2 if device == "cuda" else 1)
    images = args.images or size["images"]
    rows = bench(size["preset"], size["codebook_size"], size["grid"], [1, images], repeats, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(
        f"text-to-image sampling on {name}: GPT-2 {size['preset']} (random weights, float32), "
        f"K={size['codebook_size']}, {size['grid']}x{size['grid']} = {size['grid'] ** 2} image "
        f"tokens, CFG {CFG_SCALE}, best of {repeats} after a warm-up\n"
    )
    print(
        "| images | method | time (s) | image tokens/s | speed vs HF | first call (s) "
        "| fast = plain |"
    )
    print("|" + "---|" * 7)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
