"""Benchmark: the quantizer families side by side, each beside vector-quantize-pytorch's version.

    python scripts/bench_tokenizers.py --quick --no-peer          # a smoke run (seconds)
    python scripts/bench_tokenizers.py --dataset shapes --steps 150 --set quantizer.bypass_steps=15
    python scripts/bench_tokenizers.py --dataset photos --minutes 15 --seeds 0 1

Every row trains stage one on the recipe of `--dataset` (configs/tokenizer/<dataset>.yaml: the
architecture, data, optimizer, LR schedule, batch size, loss, bypass warm-up) with only the
quantizer section replaced by the variant's (VARIANTS), for `--steps` optimizer steps (at most
`--minutes`), one fresh process per row, then measures on the held-out split: PSNR, SSIM, codebook
usage, perplexity, dead codes (of the K codes, those the held-out split never uses), the
neighbour-swap PSNR (code-neighbourhood smoothness: the reconstruction against the decoding of the
same codes with each replaced by its nearest other code, in dB; high means an LM's near miss
draws nearly the right patch), the codes kept under noise (code_stability: the fraction of code
positions unchanged when the image gets invisible Gaussian noise), the far codes kept under an
edit (code_locality: the fraction of code positions at least 3 cells below an edited top half that
keep their id: whether a code depends only on what is near it), the shapes checker on the
reconstructions (shapes only: the text-to-image ceiling) and wall seconds per step (the whole
run, checkpoints off, the final evaluation excluded). `--remeasure` measures rows already run
again from their kept weights (final/), adding metrics that did not exist when they ran, without
training them again.

vqgpt rows train through `vqgpt.tokenizer.train.train_tokenizer`. Peer rows run the very same
function with one thing swapped: the quantizer module of the VQVAE is the peer's
(vector_quantize_pytorch's VectorQuantize / SimVQ / FSQ / LFQ, behind `PeerQuantizer`, which
only renames its outputs). So shared, exactly: encoder and decoder and their initial weights
(the VQVAE builds its quantizer from a fork of the generator, so a row's seed gives the same
encoder and decoder whatever the quantizer: rows of one seed are paired), data and its order,
optimizer, LR schedule, gradient clipping, steps, seed, loss (reconstruction + the quantizer's
own auxiliary loss), the bypass warm-up (for `bypass_steps` the decoder gets the quantizer's path
without the snapping, its projections training; then a k-means init where the method has one),
and the held-out metrics. What differs is the quantizer itself: its search, codebook upkeep and loss
(PEER_NOTES), e.g. vqgpt's VQ restarts a code unused for 20 steps from a batch vector drawn by
its error, the peer's VQ replaces a code whose EMA cluster size falls below 2 by a random batch
vector.

The peer package is not a dependency of vqgpt: `--peer` installs it once (pinned, PEER_PACKAGES,
`pip install --target <--peer-cache>/site --no-deps`: the package and its three small pure-Python
deps; torch, einops, numpy and sympy come from this environment) and only the peer rows' processes
get that folder on their path.

`--lm` (shapes, vqgpt rows) adds the LM column: for each row and each of `--lm-seeds`, one short
fixed stage-two run on that tokenizer's codes (configs/lm/shapes.yaml, `--lm-steps` steps, its
own seed; `vqgpt train-lm` in a fresh process, codes pretokenised once per row), then its held-out
image-token loss (the run's final eval.json, `split/t2i/image`, nats per image token) and the
single-draw text-to-image accuracy of `vqgpt eval --data shapes --num-images --lm-images` (the
shapes checker, CFG 1, one image per held-out caption) and its greedy captions' exact match;
results.json also keeps the per-attribute text-to-image scores and the unigram loss of the same
image tokens (the codes' own entropy, against which the LM's loss reads). Mean and standard
deviation over the LM seeds, so that the tokenizers' differences can be read against the LM's
own noise. Peer rows get no LM column (their quantizer is not vqgpt's, so vqgpt's pretokeniser
cannot load them).

Out, in `--out/<dataset>/`: `<variant>-<impl>-s<seed>/` (each row's run and its bench.json),
`rows.log` (the rows' output), `results.json` and `table.md` (also printed). A row whose bench.json
exists is not run again (rerun with a new --out), so rows can run as several processes
(`--impls vqgpt` beside `--impls peer`, one thread each) and one last run gathers the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
PEER_VERSION = "1.32.0"
PEER_PACKAGES = [
    f"vector-quantize-pytorch=={PEER_VERSION}",
    "einx==0.4.3",
    "loguru==0.7.3",
    "torch-einops-utils==0.2.0",
    "frozendict",  # einx's
]
FSQ_LEVELS = {1024: [8, 8, 4, 4], 64: [4, 4, 4]}  # K -> levels with prod(levels) = K
DEFAULT_PEER_CACHE = Path.home() / ".cache" / "vqgpt" / "bench_peer"
VARIANTS = ("vq-ste", "vq-rotation", "vq-cosine8", "simvq", "fsq", "lfq")
PEER_NOTES = {
    "vq-ste": "VectorQuantize: EMA (decay 0.95), k-means init, dead codes (EMA size < 2) "
    "replaced by batch vectors, commitment 0.25, straight-through",
    "vq-rotation": "the same with rotation_trick=True",
    "vq-cosine8": "the same, straight-through, with codebook_dim=8 and use_cosine_sim=True (the "
    "LlamaGen recipe: factorised l2-normalised codes)",
    "simvq": "SimVQ: frozen codebook x learnt linear map, rotation trick, losses 1 + 0.25",
    "fsq": "FSQ: projections 64 -> 4 -> 64, levels as vqgpt's",
    "lfq": "LFQ: projections 64 -> 10 -> 64, entropy weight 0.1, commitment 0.25",
}
# --quick: tiny data and network, K = 64, a few steps
QUICK_OVERRIDES = {
    "shapes": ["data.shapes.num_images=48", "data.shapes.num_test_images=16"],
    "photos": ["data.photos.num_images=48", "data.photos.num_test_images=16"],
    "common": [
        "model.base_channels=8",
        "quantizer.bypass_steps=1",  # so that the quantizer trains in 3 steps
        "train.batch_size=8",
        "train.max_steps=3",
        "train.warmup_steps=1",
        "train.log_every=1",
        "eval.max_images=16",
        "eval.batch_size=16",
    ],
}


@dataclass
class Job:
    """One row: a variant, vqgpt's or the peer's, one seed."""

    dataset: str
    variant: str
    impl: str  # "vqgpt" | "peer"
    seed: int
    codebook_size: int
    steps: int | None  # None: the recipe's max_steps
    minutes: float | None
    eval_images: int
    overrides: list[str]
    out: str  # the run folder

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.impl}-s{self.seed}"


# ---------------------------------------------------------------------------------------------
# the variants


def quantizer_section(variant: str, k: int, bypass_steps: int) -> dict[str, Any]:
    """vqgpt's `quantizer:` section of `variant` with K codes (fsq K in FSQ_LEVELS, lfq 2^d)."""
    common = {"codebook_size": k, "bypass_steps": bypass_steps}
    if variant in ("vq-ste", "vq-rotation"):  # the recipes' VQ, estimator aside
        estimator = variant.removeprefix("vq-")
        return dict(common, preset="default", ema_decay=0.95, estimator=estimator)
    if variant == "vq-cosine8":  # factorised l2-normalised codes (LlamaGen's 8-dim cosine codes)
        return dict(common, preset="default", ema_decay=0.95, codebook_dim=8, l2_normalize=True)
    if variant == "simvq":
        return dict(common, type="simvq", estimator="rotation")  # the peer's default
    if variant == "fsq":
        levels = FSQ_LEVELS[k]
        return dict(common, type="fsq", fsq_levels=levels, codebook_dim=len(levels))
    if variant == "lfq":
        return dict(common, type="lfq", codebook_dim=int(math.log2(k)))
    raise ValueError(f"unknown variant {variant!r}; known: {list(VARIANTS)}")


def peer_module(variant: str, dim: int, k: int):
    """vector_quantize_pytorch's module for `variant` over `dim` channels, channel-first maps."""
    import vector_quantize_pytorch as vqp

    if variant in ("vq-ste", "vq-rotation", "vq-cosine8"):
        cosine = dict(codebook_dim=8, use_cosine_sim=True) if variant == "vq-cosine8" else {}
        return vqp.VectorQuantize(
            dim=dim,
            codebook_size=k,
            **cosine,
            decay=0.95,
            kmeans_init=True,
            kmeans_iters=10,
            threshold_ema_dead_code=2,
            commitment_weight=0.25,
            rotation_trick=variant == "vq-rotation",
            accept_image_fmap=True,
        )
    if variant == "simvq":
        return vqp.SimVQ(dim=dim, codebook_size=k, rotation_trick=True, channel_first=True)
    if variant == "fsq":
        return vqp.FSQ(levels=FSQ_LEVELS[k], dim=dim, channel_first=True)
    if variant == "lfq":
        return vqp.LFQ(
            dim=dim,
            codebook_size=k,
            entropy_loss_weight=0.1,
            commitment_loss_weight=0.25,
            channel_first=True,
        )
    raise ValueError(f"unknown variant {variant!r}")


def peer_quantizer_class():
    """`PeerQuantizer` (defined here: it needs torch and vqgpt, imported in workers only)."""
    import torch
    from torch import nn

    from vqgpt.export.hub.quantization_vqgpt import fsq_bound
    from vqgpt.tokenizer.quantize import QuantizerOutput

    class PeerQuantizer(nn.Module):
        """A vector_quantize_pytorch quantizer behind vqgpt's quantizer interface:
        forward(z_e [B, D, H, W]) -> QuantizerOutput, lookup(codes [B, H, W]) -> [B, D, H, W]."""

        def __init__(self, variant: str, dim: int, k: int):
            super().__init__()
            self.peer = peer_module(variant, dim, k)
            self.dim = dim
            self.codebook_size = k

        def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
            """In float32 with autocast off, as vqgpt's quantizers run. The peer means to (its
            `force_quantization_f32` and f32 codebooks), but guards with
            `autocast("cuda", enabled=False)`, which leaves CPU autocast on: under the recipes'
            bf16 its projections, distances and LFQ's entropy ran in bf16 on this CPU (peer rows
            before 2026-12-01)."""
            with torch.autocast(device_type=z_e.device.type, enabled=False):
                out = self.peer(z_e.float())  # (quantized, ids [B, H, W], loss) or no loss (fsq)
            zero = z_e.new_zeros((), dtype=torch.float32)
            loss = out[2].float().sum() if len(out) > 2 else zero
            return QuantizerOutput(out[0].to(z_e.dtype), out[1].long(), loss, zero, zero, zero)

        def bypass(self, z_e: torch.Tensor) -> torch.Tensor:
            """The warm-up's decoder input, as vqgpt's quantizers make it: the peer's forward
            without the snapping (projections, l2 normalisation, FSQ's bound)."""
            peer = self.peer
            if self.proj_in is None:
                return z_e
            x = peer.project_in(z_e.permute(0, 2, 3, 1))  # channel last
            if getattr(peer, "use_cosine_sim", False):
                x = nn.functional.normalize(x, dim=-1)
            if hasattr(peer, "_levels"):  # FSQ: the bound before rounding, scaled like codes
                x = fsq_bound(x, peer._levels.tolist()) / (peer._levels // 2)
            return peer.project_out(x).permute(0, 3, 1, 2)

        @property
        def proj_in(self) -> nn.Module | None:
            """The peer's projection in (None: none), named as vqgpt's quantizers name it, so
            that `VQVAE.unused_in_bypass` finds what `bypass` runs (it trains in the warm-up)."""
            return self._projection("project_in")

        @property
        def proj_out(self) -> nn.Module | None:
            """The peer's projection out (None: none); see proj_in."""
            return self._projection("project_out")

        def _projection(self, name: str) -> nn.Module | None:
            module = getattr(self.peer, name, None)
            return None if module is None or isinstance(module, nn.Identity) else module

        def lookup(self, codes: torch.Tensor) -> torch.Tensor:
            """codes [B, H, W] -> [B, D, H, W] (the decoder's input)."""
            if getattr(self.peer, "use_cosine_sim", False):  # its forward uses unit codes
                embed = nn.functional.normalize(
                    self.peer.codebook.reshape(-1, self.peer.codebook.shape[-1]), dim=-1
                )
                out = self.peer.project_out(embed[codes])  # (B, H, W, D)
            elif hasattr(self.peer, "get_output_from_indices"):  # VectorQuantize
                out = self.peer.get_output_from_indices(codes)
            else:
                out = self.peer.indices_to_codes(codes)
            if out.ndim == 4 and out.shape[1] != self.dim and out.shape[-1] == self.dim:
                out = out.permute(0, 3, 1, 2)  # VectorQuantize with a projection: channel last
            return out

    return PeerQuantizer


# ---------------------------------------------------------------------------------------------
# worker: one row in a fresh process


def use_peer_quantizer(variant: str) -> None:
    """Make every VQVAE built from now on in this process hold the peer's `variant` quantizer."""
    import vqgpt.tokenizer.vqvae as vqvae

    peer = peer_quantizer_class()
    vqvae.build_quantizer = lambda dim, cfg: peer(variant, dim, cfg.codebook_size)


def recipe_of(job: Job):
    """The dataset's recipe with the job's overrides and the variant's quantizer section."""
    from vqgpt.config import apply_overrides, from_dict
    from vqgpt.tokenizer.quantize import QuantizerConfig
    from vqgpt.tokenizer.train import load_recipe

    overrides = [
        *job.overrides,
        f"train.output_dir={job.out}",
        f"train.seed={job.seed}",
        "train.eval_every=0",  # one evaluation, at the end
        "train.save_every=0",
        f"eval.max_images={job.eval_images}",
    ]
    if job.steps is not None:
        overrides.append(f"train.max_steps={job.steps}")
    if job.minutes is not None:
        overrides.append(f"train.max_minutes={job.minutes}")
    recipe = load_recipe(REPO / "configs" / "tokenizer" / f"{job.dataset}.yaml", overrides)
    bypass = recipe.quantizer.bypass_steps
    section = quantizer_section(job.variant, job.codebook_size, bypass)
    if job.impl == "vqgpt":  # --set quantizer.* (an ablation) goes over the variant's section
        given = [o for o in job.overrides if o.split("=", 1)[0].strip().startswith("quantizer.")]
        wrapped = {"quantizer": section}
        apply_overrides(wrapped, given)
        section = wrapped["quantizer"]
    recipe.quantizer = from_dict(QuantizerConfig, section, "quantizer")
    return recipe


def trained_model(final: Path):
    """The VQVAE of a run's final/ folder (a peer row's too: build_quantizer is swapped)."""
    from safetensors.torch import load_file

    from vqgpt.tokenizer.vqvae import VQVAE, VQVAEConfig

    model = VQVAE(VQVAEConfig.from_pretrained(final))
    model.load_state_dict(load_file(final / "model.safetensors"))
    return model.eval()


def nearest_other_code(model) -> torch.Tensor:
    """(K,) ids: for each code, the other code whose decoder input vector (the quantizer's
    `lookup`, after any projection out) is nearest in l2. A K x K distance table, K ~ 1,024.
    Plain codes only (one id per position); ties go to the lower id (FSQ's lattice)."""
    import torch

    k = model.codebook_size
    with torch.no_grad():
        vectors = model.quantizer.lookup(torch.arange(k).view(1, 1, k)).float()[0, :, 0].T
    distance = torch.cdist(vectors, vectors)  # (K, K)
    distance.fill_diagonal_(float("inf"))
    return distance.argmin(dim=1)


def neighbour_swap_psnr(model, codes: torch.Tensor, recon: torch.Tensor, batch: int = 100) -> float:
    """Code-neighbourhood smoothness: mean PSNR (dB) between each image's reconstruction and the
    decoding of its codes with every code replaced by its nearest other code
    (`nearest_other_code`). High: a code confused with its neighbour draws nearly the same
    patch, so an LM's near misses cost little. codes (n, h, w) of the images, recon
    (n, 3, H, W) their decoding."""
    import torch

    from vqgpt.tokenizer.metrics import psnr

    neighbour = nearest_other_code(model)
    with torch.no_grad():
        swapped = torch.cat([model.decode(neighbour[c]) for c in codes.split(batch)])
    return psnr(recon, swapped).mean().item()


STABILITY_NOISE = 0.02  # pixel noise std on the [-1, 1] scale (2.55 / 255 of the range)


def code_stability(
    model, pixels: torch.Tensor, codes: torch.Tensor, batch: int = 100, seed: int = 0
) -> float:
    """Fraction of code positions unchanged when each image gets Gaussian pixel noise of std
    STABILITY_NOISE (invisible: ~2.6 levels of 255): how consistently the same content maps to
    the same id. Near-duplicate codes flip under it, and an LM must then predict a choice the
    image does not determine. pixels (n, 3, H, W) in [-1, 1], codes (n, h, w) their codes;
    fixed noise seed."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    same = 0
    with torch.no_grad():
        for b, c in zip(pixels.split(batch), codes.split(batch), strict=True):
            noise = torch.randn(b.shape, generator=gen) * STABILITY_NOISE
            same += (model.encode((b + noise).clamp(-1, 1)) == c).sum().item()
    return same / codes.numel()


LOCALITY_GAP = 3  # cells: the edited rows end at least this many rows above the rows counted


def code_locality(
    model, pixels: torch.Tensor, codes: torch.Tensor, batch: int = 100
) -> float | None:
    """Fraction of far code positions unchanged when the top half of each image is replaced by
    the next image's top half (images rolled by one): far = the rows of the grid at least
    LOCALITY_GAP cells below the edit (rows 6 and 7 of an 8 x 8 grid). 1.0: a code depends only
    on what is near it, so the same content gets the same code whatever else the image shows;
    an LM then predicts each code from its neighbourhood (`model.local_encoder` gives 1.0 by
    construction). None when the grid has no such rows. pixels (n >= 2, 3, H, W) in [-1, 1],
    codes (n, h, w) their codes."""
    import torch

    h, height = codes.shape[1], pixels.shape[-2]
    first = h // 2 + LOCALITY_GAP - 1  # the first far row (edited rows: [0, h // 2))
    if first >= h or len(pixels) < 2:
        return None
    edited = pixels.clone()
    edited[:, :, : height // 2] = pixels.roll(1, dims=0)[:, :, : height // 2]
    with torch.no_grad():
        new = torch.cat([model.encode(b) for b in edited.split(batch)])
    return (new[:, first:] == codes[:, first:]).float().mean().item()


def measure(job: Job, recipe, final: Path) -> dict[str, Any]:
    """Held-out metrics of the trained model (and, on shapes, the checker's ceiling)."""
    import torch

    from vqgpt.data.sources import image_text_dataset
    from vqgpt.tokenizer.evaluate import EvalConfig, evaluate_tokenizer

    model = trained_model(final)
    eval_set = image_text_dataset(recipe.data, recipe.data.eval_split, train=False)
    cfg = EvalConfig(max_images=job.eval_images, batch_size=recipe.eval.batch_size, grid_images=0)
    metrics = evaluate_tokenizer(model, eval_set, cfg)
    k = job.codebook_size
    row = asdict(metrics)
    row["dead_codes"] = k - round(metrics.usage * k)
    row["ceiling"] = None
    n = min(len(eval_set), job.eval_images)
    items = [eval_set[i] for i in range(n)]
    pixels = torch.stack([it["pixel_values"] for it in items])  # (n, 3, H, W)
    with torch.no_grad():  # encoded and decoded once for the measures below
        codes = torch.cat([model.encode(b) for b in pixels.split(100)])
        recon = torch.cat([model.decode(c) for c in codes.split(100)])
    row["neighbour_psnr"] = neighbour_swap_psnr(model, codes, recon)
    row["code_stability"] = code_stability(model, pixels, codes)
    row["code_locality"] = code_locality(model, pixels, codes)
    if job.dataset == "shapes":
        from vqgpt.eval.shape_checker import t2i_scores

        texts = [it["text"] for it in items]
        row["ceiling"] = t2i_scores(texts, list(recon)).accuracy
        row["ceiling_originals"] = t2i_scores(texts, list(pixels)).accuracy
    summary = json.loads((final / "eval.json").read_text())
    row["steps"] = summary["step"]
    row["s_per_step"] = summary["elapsed_s"] / max(summary["step"], 1)
    row["precision"] = summary.get("mixed_precision")  # what the row trained in (bf16 or "no")
    return row


def run_worker(job: Job, remeasure: bool = False) -> dict[str, Any]:
    """Train and measure one row in this process; writes and returns <run>/bench.json's record.
    `remeasure`: no training; the row's kept weights (final/) are measured again and the new
    metrics merged into its existing bench.json (metrics added to the bench after it ran)."""
    import torch

    from vqgpt.tokenizer.train import train_tokenizer

    if job.impl == "peer":
        use_peer_quantizer(job.variant)
    recipe = recipe_of(job)
    if remeasure:
        done = Path(job.out) / "bench.json"
        row = dict(json.loads(done.read_text()), **measure(job, recipe, Path(job.out) / "final"))
        done.write_text(json.dumps(row, indent=2))
        return row
    final = train_tokenizer(recipe)
    row = dict(asdict(job), **measure(job, recipe, final), torch=torch.__version__)
    if job.impl == "peer":
        import importlib.metadata

        row["peer_version"] = importlib.metadata.version("vector-quantize-pytorch")
    (Path(job.out) / "bench.json").write_text(json.dumps(row, indent=2))
    return row


# ---------------------------------------------------------------------------------------------
# the LM column

# the fixed short stage-two run: lm/shapes.yaml, its steps replaced by --lm-steps; checkpoints and
# periodic evaluations off (the final evaluation gives the held-out image-token loss)
LM_OVERRIDES = ["train.eval_every=0", "train.save_every=0", "train.max_minutes=null"]
LM_QUICK_OVERRIDES = [
    "model.preset=tiny",
    "data.images.shapes.num_images=64",
    "data.images.shapes.num_test_images=16",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "eval.max_images=8",
    "eval.baseline_images=16",
]


def _cli(args: list[str], log: Path) -> None:
    """`python -m vqgpt.cli ARGS` in a fresh process, output appended to `log`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO / "src"), env.get("PYTHONPATH")] if p)
    with log.open("a") as f:
        f.write(f"\n=== vqgpt {' '.join(args)}\n")
        f.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "vqgpt.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env
        )
    if proc.returncode != 0:
        raise RuntimeError(f"vqgpt {args[0]} failed (exit {proc.returncode}); see {log}")


def lm_column(
    row: dict[str, Any], seeds: list[int], steps: int, images: int, quick: bool, log: Path
) -> dict[str, Any]:
    """The row's LM runs (one per seed; each skipped when its results exist) -> per-seed image
    loss and single-draw text-to-image accuracy, kept in the row under "lm"."""
    run = Path(row["out"])
    per_seed = []
    for seed in seeds:
        lm = run / f"lm-s{seed}"
        if not (lm / "final" / "eval.json").is_file():
            overrides = [
                f"data.tokenizer={run}",
                f"data.output_dir={run / 'lm_codes'}",
                f"train.output_dir={lm}",
                f"train.seed={seed}",
                f"train.max_steps={steps}",
                *LM_OVERRIDES,
                *(LM_QUICK_OVERRIDES if quick else []),
            ]
            _cli(["train-lm", "--config", "lm/shapes", *overrides], log)
        metrics = lm / "eval" / "metrics.json"
        if not metrics.is_file():
            args = ["eval", "--model", str(lm), "--data", "shapes", "--num-images", str(images)]
            args += ["--rerank", "1", "--caption-rerank", "1", "--seed", str(seed)]
            _cli([*args, "--out", str(lm / "eval")], log)
        losses = json.loads((lm / "final" / "eval.json").read_text())
        scores = json.loads(metrics.read_text())
        t2i = scores["t2i"]["cfg=1"]
        per_seed.append(
            dict(
                seed=seed,
                image_loss=losses["split/t2i/image"],
                # the codes' own entropy: a unigram model's loss on the same tokens
                image_loss_unigram=losses.get("unigram_split/t2i/image"),
                t2i=t2i["accuracy"],
                t2i_attributes=t2i.get("per_attribute"),  # color, shape, size, position
                caption=scores["caption"]["exact_match"],  # greedy captions of held-out images
            )
        )
    return dict(steps=steps, images=images, runs=per_seed)


# ---------------------------------------------------------------------------------------------
# the peer environment


def peer_site(cache: Path) -> Path:
    return cache / f"site-{PEER_VERSION}"


def peer_ready(cache: Path) -> bool:
    """Whether the pinned peer is installed in `cache` (the marker is written last)."""
    return (peer_site(cache) / ".complete").is_file()


def ensure_peer(cache: Path) -> Path:
    """The folder holding vector-quantize-pytorch and its small deps, installed once."""
    site = peer_site(cache)
    if peer_ready(cache):
        return site
    start = time.time()
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade"]
    subprocess.run([*cmd, "--target", str(site), *PEER_PACKAGES], check=True)
    check = [sys.executable, "-c", "import vector_quantize_pytorch"]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    )
    subprocess.run(check, check=True, env=env)
    (site / ".complete").write_text(" ".join(PEER_PACKAGES) + "\n")
    print(f"peer installed in {site} ({time.time() - start:.1f} s)", file=sys.stderr)
    return site


# ---------------------------------------------------------------------------------------------
# the table


def _mean_sd(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def _lm_cells(rs: list[dict[str, Any]]) -> str:
    """The LM columns of one (variant, impl) line: mean ± sd over every LM run of its rows."""
    runs = [run for r in rs if r.get("lm") for run in r["lm"]["runs"]]
    if not runs:
        return " - | - | - | 0 |"
    loss = _mean_sd([run["image_loss"] for run in runs], ".3f")
    t2i = _mean_sd([100 * run["t2i"] for run in runs], ".1f")
    caption = _mean_sd([100 * run["caption"] for run in runs if "caption" in run], ".1f")
    return f" {loss} | {t2i}% | {caption}% | {len(runs)} |"


def _percent_or_dash(cell: str) -> str:
    """A column's cell with a % sign, or '-' where no row of the group measured it."""
    return cell + "%" if cell != "-" else "-"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (variant, impl), mean ± sd over its seeds."""
    with_lm = any(r.get("lm") for r in rows)
    head = (
        "| variant | impl | seeds | PSNR (dB) | SSIM | usage | perplexity | dead codes "
        "| neighbour-swap PSNR (dB) | codes kept under noise | far codes kept under an edit "
        "| shapes ceiling | s / step | steps |"
        + (" LM image loss (nats) | LM t2i, 1 draw | LM captions | LM runs |" if with_lm else "")
    )
    lines = [head, "|" + "---|" * (18 if with_lm else 14)]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["impl"]), []).append(r)
    for (variant, impl), rs in groups.items():

        def col(key: str, fmt: str, scale: float = 1.0, rs=rs) -> str:
            return _mean_sd([scale * r[key] for r in rs if r.get(key) is not None], fmt)

        steps = sorted({r["steps"] for r in rs})
        lines.append(
            f"| {variant} | {impl} | {len(rs)} | {col('psnr', '.2f')} | {col('ssim', '.4f')} "
            f"| {col('usage', '.1f', 100)}% | {col('perplexity', '.0f')} | {col('dead_codes', '.0f')} "
            f"| {col('neighbour_psnr', '.2f')} | {col('code_stability', '.1f', 100)}% "
            f"| {_percent_or_dash(col('code_locality', '.1f', 100))} "
            f"| {col('ceiling', '.1f', 100) + '%' if rs[0].get('ceiling') is not None else '-'} "
            f"| {col('s_per_step', '.2f')} | {'/'.join(map(str, steps))} |"
            + (_lm_cells(rs) if with_lm else "")
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# main


def plan(args: argparse.Namespace) -> list[Job]:
    """Every row: variants x seeds x (vqgpt, then peer when asked)."""
    k = 64 if args.quick else args.codebook_size
    overrides = QUICK_OVERRIDES[args.dataset] + QUICK_OVERRIDES["common"] if args.quick else []
    overrides = overrides + args.set
    steps = args.steps if args.steps is not None else (3 if args.quick else None)
    eval_images = 16 if args.quick else args.eval_images
    impls = args.impls or (["vqgpt", "peer"] if args.peer else ["vqgpt"])
    jobs = []
    for variant in args.variants:
        for seed in args.seeds:
            for impl in impls:
                run = Path(args.out) / args.dataset / f"{variant}-{impl}-s{seed}"
                jobs.append(
                    Job(
                        args.dataset, variant, impl, seed, k, steps, args.minutes, eval_images,
                        overrides, str(run),
                    )
                )  # fmt: skip
    return jobs


def run_job(job: Job, site: Path | None, log: Path, remeasure: bool = False) -> dict[str, Any]:
    """One row in a fresh process (the peer's folder on its path for a peer row). A row already
    run is not run again; with `remeasure` its kept weights are measured again (run_worker)."""
    done, weights = Path(job.out) / "bench.json", Path(job.out) / "final" / "model.safetensors"
    if done.is_file() and not (remeasure and weights.is_file()):
        return json.loads(done.read_text())
    paths = [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    if job.impl == "peer":
        paths.insert(0, str(site))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    cmd = [sys.executable, __file__, "--worker", json.dumps(asdict(job))]
    if done.is_file():
        cmd.append("--remeasure")
    with log.open("a") as f:
        f.write(f"\n=== {job.name}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"row {job.name} failed (exit {proc.returncode}); see {log}")
    return json.loads(done.read_text())


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every row, write results.json and table.md, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=["shapes", "photos"], default="shapes")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, help="optimizer steps per row (default: the recipe's)")
    parser.add_argument("--minutes", type=float, help="wall-clock cap per row (default: none)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides for every row, e.g. quantizer.bypass_steps=20; other quantizer.* "
        "keys go over the variant's section in vqgpt's rows only (an ablation, e.g. "
        "quantizer.dead_code_threshold=2; peer rows read only bypass_steps)",
    )
    parser.add_argument("--codebook-size", type=int, choices=[1024], default=1024)
    parser.add_argument("--eval-images", type=int, default=500, help="held-out images measured")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=["vqgpt", "peer"],
        help="only these rows of each variant and seed (default: vqgpt, and peer with --peer); "
        "e.g. two processes side by side on one --out, one with --impls vqgpt and one with "
        "--impls peer, then one more run of both to gather the table from their bench.json",
    )
    parser.add_argument(
        "--peer-cache",
        default=str(DEFAULT_PEER_CACHE),
        help="where the peer is installed (once)",
    )
    parser.add_argument(
        "--lm", action="store_true", help="add the LM column (shapes, vqgpt rows; see above)"
    )
    parser.add_argument("--lm-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lm-steps", type=int, default=400, help="steps of each LM run")
    parser.add_argument("--lm-images", type=int, default=100, help="held-out captions drawn")
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="rows already run are measured again from their kept weights (final/), the new "
        "metrics merged into their bench.json (rows run before a metric was added)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, K=64, 3 steps")
    parser.add_argument("--out", default="runs/bench_tokenizers")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(Job(**json.loads(args.worker)), args.remeasure)))
        return

    # SIGTERM (a job scheduler, `kill`) ends the script as Ctrl-C does: subprocess.run then kills
    # the row's or LM run's process instead of leaving it running without its parent
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.lm and args.dataset != "shapes":
        parser.error("--lm needs --dataset shapes (text-to-image is scored by the shapes checker)")
    if args.impls and "peer" in args.impls and not args.peer:
        parser.error("--impls peer needs --peer (the default)")
    site = ensure_peer(Path(args.peer_cache)) if args.peer else None
    out = Path(args.out) / args.dataset
    out.mkdir(parents=True, exist_ok=True)
    log = out / ("rows.log" if not args.impls else f"rows-{'-'.join(args.impls)}.log")
    rows = []
    for job in plan(args):
        start = time.time()
        row = run_job(job, site, log, args.remeasure)
        if args.lm and job.impl == "vqgpt":
            lm_steps = 2 if args.quick else args.lm_steps
            lm_images = 4 if args.quick else args.lm_images
            row["lm"] = lm_column(row, args.lm_seeds, lm_steps, lm_images, args.quick, log)
        rows.append(row)
        print(f"done: {job.name} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    text = table(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "table.md").write_text(text + "\n")
    ceiling = [r["ceiling_originals"] for r in rows if r.get("ceiling_originals") is not None]
    print(
        f"{args.dataset}: K={rows[0]['codebook_size']}, held-out images {rows[0]['num_images']}"
        + (f", shapes checker on the originals {100 * ceiling[0]:.1f}%" if ceiling else "")
        + "; peer = vector-quantize-pytorch "
        + (rows[-1].get("peer_version", "-") if args.peer else "(off)")
        + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
