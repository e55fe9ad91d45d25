"""The trained pipeline's held-out scores: captioning and text-to-image on a held-out split."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from vqgpt.config import ConfigError
from vqgpt.data.images import ImageTransform, load_rgb
from vqgpt.data.shapes import parse_caption
from vqgpt.data.sources import DataConfig, ImageTextDataset, load_image_dataset
from vqgpt.eval.shape_checker import check, t2i_scores
from vqgpt.eval.text_metrics import caption_scores
from vqgpt.lm.infer import caption_images, generate_images
from vqgpt.lm.sampling import SamplingConfig
from vqgpt.tokenizer.codec import reconstruct_images
from vqgpt.tokenizer.evaluate import EvalConfig, TokenizerMetrics, evaluate_tokenizer


@dataclass
class PipelineEvalConfig:
    """Held-out captioning and text-to-image evaluation of a trained pipeline."""

    num_images: int = 200  # held-out images to caption, and held-out captions to draw
    # text-to-image is scored at each scale: no guidance, and the sampling default
    cfg_scales: tuple[float, ...] = (1.0, SamplingConfig.cfg_scale)
    temperature: float = SamplingConfig.temperature  # text-to-image sampling
    top_k: int = SamplingConfig.top_k
    caption_beams: int = 1  # 1 = greedy captions
    # > 1: the last of cfg_scales is also scored with self-reranking (best of this many drawn
    # images by the LM's own caption likelihood, `vqgpt.lm.generate.rerank_by_caption`)
    rerank: int = 1
    # > 1: captions are also scored with noisy-channel self-reranking: the greedy caption plus
    # caption_rerank - 1 drawn at caption_temperature (`vqgpt.lm.generate.rerank_captions`)
    caption_rerank: int = 1
    caption_temperature: float = SamplingConfig.temperature
    seed: int = 0
    batch_size: int = SamplingConfig.batch_size

    def __post_init__(self) -> None:
        counts = (self.num_images, self.batch_size, self.caption_beams, self.rerank)
        if min(*counts, self.caption_rerank) < 1:
            raise ConfigError(
                "eval.num_images, eval.batch_size, eval.caption_beams, eval.rerank, "
                "eval.caption_rerank must be >= 1"
            )
        if not self.cfg_scales:
            raise ConfigError("eval.cfg_scales needs at least one scale (1.0 = no guidance)")


@dataclass
class PipelineEval:
    """Scores of one pipeline on held-out data, plus samples for the report."""

    tokenizer: TokenizerMetrics | None
    caption: dict  # CaptionScores as a dict
    t2i: dict[str, dict]  # "cfg=<scale>" -> T2IScores as a dict
    caption_samples: list[tuple]  # (PIL image, reference, prediction)
    t2i_samples: dict[str, list[tuple]]  # "cfg=<scale>" -> (prompt, PIL image, ok)
    # the same scores for the held-out images passed through the image tokenizer: what a perfect
    # LM (one that writes exactly the codes of the true image) would score, its ceiling
    t2i_ceiling: dict | None = None
    caption_reranked: dict | None = None  # CaptionScores with noisy-channel reranking

    def to_json(self) -> dict:
        out = {"caption": self.caption, "t2i": self.t2i}
        if self.caption_reranked is not None:
            out["caption_reranked"] = self.caption_reranked
        if self.t2i_ceiling is not None:
            out["t2i_ceiling"] = self.t2i_ceiling
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer.to_log()
        return out

    def markdown(self) -> str:
        """The scores as Markdown tables."""
        lines = []
        if self.tokenizer is not None:
            t = self.tokenizer
            lines += [
                "| tokenizer (held-out) | PSNR (dB) | SSIM | codebook usage | perplexity | images |",
                "|---|---|---|---|---|---|",
                f"| | {t.psnr:.2f} | {t.ssim:.4f} | {100 * t.usage:.1f}% | {t.perplexity:.1f} "
                f"| {t.num_images} |",
                "",
            ]
        attrs = list(self.caption.get("per_attribute", {}))
        lines += [
            "| captioning (held-out) | exact match | " + " | ".join(attrs) + " | BLEU-4 | images |",
            "|---|---|" + "---|" * len(attrs) + "---|---|",
        ]
        captions = {"greedy": self.caption}
        if self.caption_reranked is not None:
            captions[self.caption_reranked["name"]] = self.caption_reranked
        for name, c in captions.items():
            lines.append(_score_row(name, c, "exact_match", attrs, extra=(f"{c['bleu4']:.3f}",)))
        lines.append("")
        keys = list(next(iter(self.t2i.values())).get("per_attribute", {}))
        lines += [
            "| text-to-image (held-out captions) | all objects right | "
            + " | ".join(keys)
            + " | images |",
            "|---|---|" + "---|" * len(keys) + "---|",
        ]
        rows = dict(self.t2i)
        if self.t2i_ceiling is not None:
            rows["ceiling: the true images through the tokenizer"] = self.t2i_ceiling
        lines += [_score_row(name, s, "accuracy", keys) for name, s in rows.items()]
        return "\n".join(lines) + "\n"


def _score_row(
    name: str, scores: dict, headline: str, attrs: list[str], extra: tuple[str, ...] = ()
) -> str:
    """`| name | headline % | attribute %s | extra cells | n |` for one row of a score table."""
    per = scores.get("per_attribute", {})
    cells = [
        name,
        f"{100 * scores[headline]:.1f}%",
        *(f"{100 * per[k]:.1f}%" for k in attrs),
        *extra,
        str(scores["n"]),
    ]
    return "| " + " | ".join(cells) + " |"


def _held_out(data: DataConfig, n: int):
    """The first `n` readable rows of the eval split: (PIL images, captions)."""
    ds = load_image_dataset(data, data.eval_split)
    images, texts = [], []
    for row in ds:
        image = load_rgb(row["image"])
        if image is not None:
            images.append(image)
            texts.append(row["text"])
        if len(images) == n:
            break
    return images, texts


def evaluate_pipeline(
    pipe, data: DataConfig, cfg: PipelineEvalConfig, tokenizer_eval: EvalConfig | None = None
) -> PipelineEval:
    """Caption held-out images and draw held-out captions; score both (shapes: exact checks)."""
    images, texts = _held_out(data, cfg.num_images)
    if not images:
        raise ValueError(f"the {data.eval_split} split of {data.source} has no readable images")
    tok = None
    if tokenizer_eval is not None:
        size = pipe.image_tokenizer.config.arch.image_size
        held = ImageTextDataset(
            load_image_dataset(data, data.eval_split), ImageTransform(size, random_crop=False)
        )
        tok = evaluate_tokenizer(pipe.image_tokenizer, held, tokenizer_eval)

    greedy = SamplingConfig(
        do_sample=False, num_beams=cfg.caption_beams, seed=cfg.seed, batch_size=cfg.batch_size
    )
    predictions = caption_images(pipe, images, greedy)
    caption = _as_dict(caption_scores(predictions, texts))
    reranked = None
    if cfg.caption_rerank > 1:
        drawn = replace(greedy, rerank=cfg.caption_rerank, temperature=cfg.caption_temperature)
        reranked = _plain(_as_dict(caption_scores(caption_images(pipe, images, drawn), texts)))
        reranked["name"] = (
            f"greedy + {cfg.caption_rerank - 1} drawn (T {cfg.caption_temperature:g}), "
            "noisy-channel reranked"
        )
    t2i, t2i_samples = {}, {}
    runs = [(scale, 1) for scale in cfg.cfg_scales]
    if cfg.rerank > 1:
        runs.append((cfg.cfg_scales[-1], cfg.rerank))
    for scale, rerank in runs:
        sampling = SamplingConfig(
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            cfg_scale=scale,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            rerank=rerank,
        )
        drawn = generate_images(pipe, texts, 1, sampling)
        name = f"cfg={scale:g}" + (f", best of {rerank}" if rerank > 1 else "")
        scores = t2i_scores(texts, drawn)
        t2i[name] = _as_dict(scores)
        t2i_samples[name] = [
            (p, im, _all_match(im, p)) for p, im in zip(texts[:16], drawn[:16], strict=True)
        ]
    ceiling = t2i_scores(texts, reconstruct_images(pipe.image_tokenizer, images))
    return PipelineEval(
        tokenizer=tok,
        caption=_plain(caption),
        t2i={k: _plain(v) for k, v in t2i.items()},
        caption_samples=list(zip(images[:16], texts[:16], predictions[:16], strict=True)),
        t2i_samples=t2i_samples,
        t2i_ceiling=_plain(_as_dict(ceiling)),
        caption_reranked=reranked,
    )


def _all_match(image, prompt: str) -> bool:
    try:
        return bool(check(image, parse_caption(prompt)).all_match)
    except ValueError:
        return False


def _as_dict(scores) -> dict:
    return scores._asdict() if hasattr(scores, "_asdict") else asdict(scores)


def _plain(d: dict) -> dict:
    """Drop values that are not JSON data (e.g. per-item lists stay, tensors go)."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, dict, list, bool))}
