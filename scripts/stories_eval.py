"""Shapes stories: score a trained LM on held-out story prompts, next to its caption and t2i scores.

For every held-out story prompt (`data.stories.stories_prompts`: each scene of each test story, cut
before its image when its sentence asks for it, after its image when a sentence should describe it)
the LM continues the document once (single draws); `eval.story_checker` scores the images it opens
(image fidelity: the checker finds the objects the sentence asked for) and the sentences it writes
(text faithfulness: they name the image's objects). The same LM's held-out captioning and
text-to-image scores (`eval.pipeline.evaluate_pipeline`) follow, all as Markdown tables.

    python scripts/stories_eval.py --run runs/stories/lm [--num-stories 200] [--num-images 200]

The stories are those of the run's recipe (<run>/config.yaml, data.documents.stories), so the
held-out prompts are the split the LM never saw. Documents are continued by
`vqgpt.lm.infer.continue_documents`; `evaluate_stories` takes any callable of the
`ContinueDocuments` shape (the tests use a fake one).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import yaml
from PIL import Image

from vqgpt.config import from_dict
from vqgpt.data.stories import StoriesConfig, StoryPrompt, stories_prompts
from vqgpt.eval.story_checker import Answer, StoryScores, answer_of, percent, story_scores


class ContinueDocuments(Protocol):
    def __call__(self, documents: list[list[dict]]) -> list[list[dict]]:
        """Per document (segments {"text", "image"}), the segments the model writes after it;
        only the first is scored, so a generator may stop after one."""
        ...


def story_answers(
    prompts: Sequence[StoryPrompt], generate: ContinueDocuments, batch_size: int
) -> list[Answer]:
    """Continue each prompt's document once (in batches) and pick out its answer."""
    answers: list[Answer] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        continuations = generate([list(p.segments) for p in chunk])
        if len(continuations) != len(chunk):
            raise ValueError(
                f"the generator continued {len(continuations)} of {len(chunk)} documents"
            )
        answers += [answer_of(p, c) for p, c in zip(chunk, continuations, strict=True)]
    return answers


def evaluate_stories(
    prompts: Sequence[StoryPrompt], generate: ContinueDocuments, batch_size: int = 16
) -> StoryScores:
    """Image fidelity and text faithfulness of one continuation per prompt."""
    return story_scores(prompts, story_answers(prompts, generate, batch_size))


def summary_table(stories: StoryScores, pipeline: dict | None = None) -> str:
    """One Markdown table: the two story scores, then (given `PipelineEval.to_json()`) the same
    LM's held-out caption exact match and text-to-image accuracy at each guidance scale."""
    rows = [
        (
            "stories: image fidelity (objects asked for, found)",
            stories.image.accuracy,
            stories.image.n,
        ),
        (
            "stories: text faithfulness (image's objects named)",
            stories.text.accuracy,
            stories.text.n,
        ),
    ]
    if pipeline is not None:
        caption = pipeline["caption"]
        rows.append(("captioning: exact match (greedy)", caption["exact_match"], caption["n"]))
        rows += [
            (f"text-to-image: all objects right ({name})", s["accuracy"], s["n"])
            for name, s in pipeline["t2i"].items()
        ]
    lines = ["| held-out score | value | n |", "|---|---|---|"]
    lines += [f"| {name} | {percent(value)} | {n} |" for name, value, n in rows]
    return "\n".join(lines) + "\n"


def run_stories_config(run: str | Path) -> StoriesConfig:
    """The stories of a run's recipe (<run>/config.yaml, data.documents.stories); defaults when
    the recipe names none."""
    recipe = yaml.safe_load((Path(run) / "config.yaml").read_text(encoding="utf-8")) or {}
    stories = (recipe.get("data") or {}).get("documents", {}).get("stories", {})
    return from_dict(StoriesConfig, stories, "data.documents.stories")


def document_generator(
    pipe, sampling, unconditional: str = "caption_dropped"
) -> ContinueDocuments:  # pipe: vqgpt.lm.pipeline.Pipeline
    """The LM's document continuation (`vqgpt.lm.infer.continue_documents`), stopped after its
    first image: enough for one sentence or one image, the answer to a story prompt."""
    from vqgpt.lm.infer import continue_documents

    # room for a sentence (shapes captions <= 17 tokens, + "that was" / ".") and one framed image
    budget = pipe.layout.tokens_per_image + 2 + 32

    def generate(documents: list[list[dict]]) -> list[list[dict]]:
        prompts = [
            [s["text"] if s["text"] is not None else s["image"] for s in d] for d in documents
        ]
        done = continue_documents(
            pipe,
            prompts,
            sampling,
            max_new_tokens=budget,
            max_images=1,
            unconditional=unconditional,
        )
        return [[as_segment(s) for s in c.segments] for c in done]

    return generate


def as_segment(value: str | Image.Image) -> dict:
    """A generated text or image as a segment of the document contract."""
    return (
        {"text": value, "image": None} if isinstance(value, str) else {"text": None, "image": value}
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", required=True, help="a trained LM run folder (config.yaml, final/)"
    )
    parser.add_argument("--num-stories", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--num-images", type=int, default=200, help="caption / t2i held-out images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pipeline", action="store_true", help="stories scores only")
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature of story continuations and text-to-image draws (default: "
        "vqgpt's, SamplingConfig.temperature); captions stay greedy",
    )
    parser.add_argument(
        "--cfg",
        type=float,
        default=None,
        help="classifier-free guidance scale of story images and text-to-image draws (default: "
        "vqgpt's, SamplingConfig.cfg_scale)",
    )
    parser.add_argument(
        "--cfg-unconditional",
        default="caption_dropped",
        choices=["caption_dropped", "previous_image"],
        help="the unconditional branch of guided story images (vqgpt.lm.continuation)",
    )
    args = parser.parse_args(argv)

    from vqgpt.eval.pipeline import PipelineEvalConfig, evaluate_pipeline
    from vqgpt.lm.pipeline import Pipeline
    from vqgpt.lm.sampling import SamplingConfig
    from vqgpt.lm.train import load_lm_recipe

    stories = run_stories_config(args.run)
    if args.num_stories is not None:
        stories = replace(stories, num_test_stories=args.num_stories)
    prompts = stories_prompts(stories, "test")
    pipe = Pipeline.from_pretrained(args.run)
    sampling = SamplingConfig(seed=args.seed, batch_size=args.batch_size)  # single draws
    if args.temperature is not None:
        sampling = replace(sampling, temperature=args.temperature)
    if args.cfg is not None:
        sampling = replace(sampling, cfg_scale=args.cfg)
    scores = evaluate_stories(
        prompts, document_generator(pipe, sampling, args.cfg_unconditional), args.batch_size
    )
    pipeline = None
    if not args.no_pipeline:
        recipe = load_lm_recipe(Path(args.run) / "config.yaml")
        cfg = PipelineEvalConfig(
            num_images=args.num_images,
            seed=args.seed,
            batch_size=args.batch_size,
            temperature=sampling.temperature,
            cfg_scales=(1.0, sampling.cfg_scale),
        )
        pipeline = evaluate_pipeline(pipe, recipe.data.images, cfg)
    print(f"{args.run}: {stories.num_test_stories} held-out stories, {len(prompts)} prompts\n")
    print(summary_table(scores, None if pipeline is None else pipeline.to_json()))
    print(scores.markdown())
    if pipeline is not None:
        print(pipeline.markdown())


if __name__ == "__main__":
    main()
