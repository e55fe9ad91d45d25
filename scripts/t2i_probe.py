"""Why a text-to-image LM draws worse than its loss says: teacher-forced and half-drawn probes.

For held-out shapes captions and their true images (the run's recipe, `data.images`, eval split),
two measurements on one or more trained LM runs:

1. **Teacher-forced** (`--teacher`): the 64 true codes after `eos caption boi` in one forward, the
   image-only head (every log-prob renormalised over the K image ids, as decoding does): mean NLL
   per code (nats), how often the true code is the most likely one (top-1), and the entropy of the
   next-code distribution at `--temperature`; each over all codes, over the codes of cells that
   show part of an object and over the background cells (a cell: the 8x8 pixels one code covers;
   an object cell: more than 5% of its pixels differ from the image's border colour by > 60 in
   any channel).
2. **Half-drawn** (`--prefix K ...`): the first K codes of the true image are given (teacher-
   forced, raster order), the LM draws the other 64 - K (temperature, CFG scale, one draw each,
   seeded), and the shapes checker scores the decoded image against its caption. K = 0 is plain
   single-draw text-to-image (`evaluate_pipeline`'s figure at the same settings); as K grows the
   LM has fewer of its own draws to recover from. A model whose score at K = 0 trails another's
   while its teacher-forced figures lead is one that recovers worse from its own early draws.

    OMP_NUM_THREADS=1 python scripts/t2i_probe.py --run runs/demo/lm runs/stories/lm \
        --teacher --prefix 0 8 16 32 [--num-images 200 --cfg 1.5 --temperature 0.5 --seed 0]

Prints one Markdown table per measurement. Reads nothing but the runs (their config.yaml and
final/) and writes nothing.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CELL_SHARE = 0.05  # an object cell: more than this share of its pixels off the background
COLOUR_GAP = 60.0  # ... by more than this in some channel (0..255)


@dataclass
class Heldout:
    captions: list[str]
    codes: torch.Tensor  # [B, h, w] the tokenizer's codes of the true images
    objects: torch.Tensor  # [B, h * w] bool: the cell shows part of an object


def object_cells(image: Image.Image, grid: tuple[int, int]) -> np.ndarray:
    """[h * w] bool: cells where more than CELL_SHARE of the pixels differ from the border colour."""
    from vqgpt.eval.shape_checker import _background

    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    off = (np.abs(px - _background(px)) > COLOUR_GAP).any(-1)  # (H, W)
    h, w = grid
    cells = off.reshape(h, px.shape[0] // h, w, px.shape[1] // w).mean(axis=(1, 3))
    return (cells > CELL_SHARE).reshape(-1)


def held_out(pipe, run: str, n: int) -> Heldout:
    from vqgpt.eval.pipeline import _held_out
    from vqgpt.lm.infer import encode_images
    from vqgpt.lm.train import load_lm_recipe

    recipe = load_lm_recipe(Path(run) / "config.yaml")
    images, captions = _held_out(recipe.data.images, n)
    codes = encode_images(pipe, images).cpu()
    grid = pipe.layout.grid
    objects = torch.as_tensor(np.stack([object_cells(im, grid) for im in images]))
    return Heldout(captions, codes, objects)


def _prompts(pipe, captions: list[str]) -> tuple[list[list[int]], list[int]]:
    """`eos caption boi` in the model's training format, and CFG's caption-dropped prompt."""
    from vqgpt.lm.generate import t2i_prompts
    from vqgpt.lm.sampling import SamplingConfig

    ids = pipe.tokenizer.encode_texts(captions)
    out = t2i_prompts(pipe.lm, pipe.layout, ids, SamplingConfig(cfg_scale=2.0))  # any scale != 1
    return out.prompts, out.uncond_prompt


@torch.no_grad()
def teacher_forced(pipe, data: Heldout, temperature: float, batch_size: int) -> dict:
    """Per-code NLL, top-1 and entropy at `temperature`, over all / object / background cells."""
    from vqgpt.lm.decoding import inference
    from vqgpt.lm.positions import ImagePositions, forward_position_ids

    layout, model = pipe.layout, pipe.lm
    prompts, _ = _prompts(pipe, data.captions)
    code_ids = layout.codes_to_ids(data.codes.flatten(1))  # [B, 64]
    rows = [torch.tensor(p + c.tolist()) for p, c in zip(prompts, code_ids, strict=True)]
    lo, hi = layout.image_offset, layout.vocab_size
    nll, top1, ent = [], [], []
    with inference(model):
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            width = max(len(r) for r in part)  # left-pad: every row's codes end at the right
            ids = torch.full((len(part), width), layout.eos_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(part):
                ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
            positions = forward_position_ids(ids, mask, ImagePositions.of(model.config))
            hidden = model.base_model(
                input_ids=ids, attention_mask=mask, position_ids=positions
            ).last_hidden_state
            n_codes = code_ids.shape[1]
            hidden = hidden[:, -n_codes - 1 : -1]  # the states that predict the 64 codes
            head = model.get_output_embeddings()  # image rows only, as the narrow head
            bias = None if head.bias is None else head.bias[lo:hi].float()
            logits = F.linear(hidden.float(), head.weight[lo:hi].float(), bias)  # [b, 64, K]
            logp = logits.log_softmax(-1)
            target = code_ids[start : start + len(part)] - lo
            nll.append(-logp.gather(-1, target.unsqueeze(-1)).squeeze(-1))
            top1.append(logits.argmax(-1) == target)
            warm = (logits / temperature).log_softmax(-1)
            ent.append(-(warm.exp() * warm).sum(-1))
    nll, top1, ent = torch.cat(nll), torch.cat(top1).float(), torch.cat(ent)
    out = {}
    for name, where in (
        ("all", torch.ones_like(data.objects)),
        ("object", data.objects),
        ("background", ~data.objects),
    ):
        out[name] = {
            "nll": float(nll[where].mean()),
            "top1": float(top1[where].mean()),
            "entropy": float(ent[where].mean()),
            "share": float(where.float().mean()),
        }
    return out


@torch.no_grad()
def half_drawn_codes(
    pipe, data: Heldout, k: int, cfg_scale: float, temperature: float, seed: int, bs: int
) -> torch.Tensor:
    """Codes [B, h, w]: the first `k` true codes (raster order), the rest drawn by the LM, each
    row seeded as `ImageSampler` seeds it (so k = 0 draws what plain text-to-image draws)."""
    from einops import rearrange

    from vqgpt.lm.decoding import KVDecoder, decode_loop, inference, narrow_head, vocab_width
    from vqgpt.lm.sampling import SamplingConfig, image_token_mask

    layout, model = pipe.layout, pipe.lm
    h, w = layout.grid
    prompts, uncond = _prompts(pipe, data.captions)
    given = layout.codes_to_ids(data.codes.flatten(1)[:, :k]).tolist()
    sampling = SamplingConfig(
        temperature=temperature, cfg_scale=cfg_scale, seed=seed, batch_size=bs
    )
    allowed = image_token_mask(layout, vocab_width(model), pipe.device)
    decoder = KVDecoder(model, "dynamic", narrow_head(model, allowed))
    drawn = []
    with inference(model):
        for start in range(0, len(prompts), bs):
            stop = min(start + bs, len(prompts))
            batch = [prompts[i] + given[i] for i in range(start, stop)]
            guided = [uncond + given[i] for i in range(start, stop)] if cfg_scale != 1 else None
            out = decode_loop(
                decoder,
                batch,
                allowed,
                sampling,
                h * w - k,
                pad_id=layout.eos_id,
                uncond_prompts=guided,
                row_ids=range(start, stop),
            )
            drawn.append(layout.ids_to_codes(out.tokens).cpu())
    codes = torch.cat([data.codes.flatten(1)[:, :k], torch.cat(drawn)], dim=1)
    return rearrange(codes, "b (h w) -> b h w", h=h, w=w)


def half_drawn(pipe, data: Heldout, k: int, cfg_scale: float, temperature: float, seed: int, bs):
    """Shapes-checker accuracy (and per attribute) of `half_drawn_codes`' images."""
    from vqgpt.eval.shape_checker import t2i_scores
    from vqgpt.lm.infer import decode_codes

    codes = half_drawn_codes(pipe, data, k, cfg_scale, temperature, seed, bs)
    scores = t2i_scores(data.captions, decode_codes(pipe, codes))
    return {"accuracy": scores.accuracy, **scores.per_attribute}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs="+", required=True, help="trained LM run folders")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--teacher", action="store_true", help="the teacher-forced table")
    parser.add_argument("--prefix", type=int, nargs="*", default=[], help="true codes given")
    parser.add_argument("--cfg", type=float, default=1.5, help="CFG scale of the draws")
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args(argv)

    from vqgpt.lm.pipeline import Pipeline

    teacher, drawn = {}, {}
    for run in args.run:
        pipe = Pipeline.from_pretrained(run)
        data = held_out(pipe, run, args.num_images)
        if args.teacher:
            teacher[run] = teacher_forced(pipe, data, args.temperature, args.batch_size)
        for k in args.prefix:
            drawn[run, k] = half_drawn(
                pipe, data, k, args.cfg, args.temperature, args.seed, args.batch_size
            )
            print(f"{run} K={k}: {100 * drawn[run, k]['accuracy']:.1f}%", flush=True)
    print(f"\n{args.num_images} held-out captions; T {args.temperature:g}, CFG {args.cfg:g}\n")
    if teacher:
        print("| run | cells | share | NLL / code (nats) | top-1 | entropy at T |")
        print("|---|---|---|---|---|---|")
        for run, parts in teacher.items():
            for name, s in parts.items():
                print(
                    f"| {run} | {name} | {100 * s['share']:.1f}% | {s['nll']:.3f} | "
                    f"{100 * s['top1']:.1f}% | {s['entropy']:.3f} |"
                )
        print()
    if drawn:
        print("| run | true codes given (K) | all objects right | shape | colour | position |")
        print("|---|---|---|---|---|---|")
        for (run, k), s in drawn.items():
            print(
                f"| {run} | {k} | {100 * s['accuracy']:.1f}% | {100 * s['shape']:.1f}% | "
                f"{100 * s['color']:.1f}% | {100 * s['position']:.1f}% |"
            )


if __name__ == "__main__":
    main()
