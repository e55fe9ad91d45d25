"""Continuing interleaved documents: whole images only, eoi forced, budgets, seeds, CFG, outputs."""

from __future__ import annotations

import inspect
import itertools
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vqgpt.lm.continuation import (
    check_document_prompt,
    continue_document_ids,
    document_prompt,
    split_continuation,
)
from vqgpt.lm.pipeline import Pipeline
from vqgpt.lm.sampling import SamplingConfig
from vqgpt.lm.sequences import SequenceLengthError, build_document
from vqgpt.lm.vocab import VocabLayout

# eos 99, boi 100, eoi 101, images 102..117 (as in test_generate.py)
LAYOUT = VocabLayout(codebook_size=16, grid=(3, 3), text_vocab_size=100)
HW = 9
N_POSITIONS = 128
SAMPLE = SamplingConfig(temperature=1.0, cfg_scale=1.0, seed=0)
FIXTURES = Path(__file__).parents[1] / "fixtures" / "v0.1.0"


@pytest.fixture(scope="module")
def model(tiny_gpt2):
    return tiny_gpt2(LAYOUT, n_positions=N_POSITIONS)


def columns(*ids: int, ranges: tuple[range, ...] = ()) -> torch.Tensor:
    """Bool [128] over the tiny model's logit columns: True on `ids` and `ranges`."""
    out = torch.zeros(128, dtype=torch.bool)
    out[list(ids)] = True
    for r in ranges:
        out[r.start : r.stop] = True
    return out


IMAGE_IDS = range(LAYOUT.image_offset, LAYOUT.vocab_size)
PROMPTS = [[99, 5, 17, 3], [99], [99, 42, 100, *range(102, 111), 101, 7], [99, 8, 8]]


def assert_well_formed(tokens: list[int]) -> int:
    """Only text outside images, exactly HW image codes between boi and eoi; the images."""
    images, i = 0, 0
    while i < len(tokens):
        t = tokens[i]
        if t == LAYOUT.boi_id:
            inside = tokens[i + 1 : i + 1 + HW]
            assert len(inside) == HW and all(c in IMAGE_IDS for c in inside), tokens
            assert tokens[i + 1 + HW] == LAYOUT.eoi_id, tokens  # eoi always follows
            images, i = images + 1, i + HW + 2
            continue
        assert 0 <= t < LAYOUT.text_vocab_size, tokens  # never an image code or eoi outside
        assert t != LAYOUT.eos_id or i == len(tokens) - 1, tokens  # eos ends the document
        i += 1
    return images


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_images_are_whole_and_codes_appear_only_inside_them(model, boost_logits, cfg):
    # boi likely (images open often); eoi and the image ids overwhelmingly likely in text steps:
    # the masks must still keep them out of the text
    strong = boost_logits(model, columns(LAYOUT.eoi_id, ranges=(IMAGE_IDS,)), 40.0)
    handle = boost_logits(model, columns(LAYOUT.boi_id), 3.0)
    try:
        total = 0
        for seed in range(5):
            sampling = replace(SAMPLE, seed=seed, cfg_scale=cfg)
            runs = continue_document_ids(model, LAYOUT, PROMPTS, sampling, 60, max_images=10)
            for run in runs:
                images = assert_well_formed(run.tokens)
                assert images == run.images
                total += images
    finally:
        handle.remove()
        strong.remove()
    assert total >= 15, total  # images did occur (19 with these seeds)


def test_the_token_image_and_context_budgets_stop_it(model, boost_logits):
    handle = boost_logits(model, columns(LAYOUT.boi_id), 6.0)
    try:
        one = continue_document_ids(model, LAYOUT, PROMPTS, SAMPLE, 100, max_images=1)
        assert {r.stop for r in one} == {"max_images"} and {r.images for r in one} == {1}
        assert all(len(r.tokens) < 100 for r in one)
        none = continue_document_ids(model, LAYOUT, PROMPTS, SAMPLE, 100, max_images=0)
        assert {r.stop for r in none} == {"max_images"} and {r.images for r in none} == {0}
        # 10 tokens hold no image (boi + 9 codes + eoi): it stops instead of opening one
        short = continue_document_ids(model, LAYOUT, PROMPTS, SAMPLE, 10, max_images=5)
        assert all(r.images == 0 and len(r.tokens) <= 10 for r in short)
        # the context: a long prompt leaves room for text but not for an image
        long_prompt = [99, *[7] * (N_POSITIONS - HW - 2)]  # one token short of an image
        (run,) = continue_document_ids(model, LAYOUT, [long_prompt], SAMPLE, 100, max_images=5)
        assert run.stop == "n_positions" and run.images == 0
        assert len(long_prompt) + len(run.tokens) <= N_POSITIONS
        many = continue_document_ids(model, LAYOUT, PROMPTS, SAMPLE, 500, max_images=500)
        for prompt, r in zip(PROMPTS, many, strict=True):
            assert r.stop == "n_positions" and len(prompt) + len(r.tokens) <= N_POSITIONS
            assert r.images >= 5
    finally:
        handle.remove()
    plain = continue_document_ids(model, LAYOUT, PROMPTS, SAMPLE, 7, max_images=0)
    for r in plain:
        assert r.stop in ("eos", "max_new_tokens", "max_images")
        assert len(r.tokens) == 7 or r.stop != "max_new_tokens"
    handle = boost_logits(model, columns(LAYOUT.eos_id), 50.0)
    try:
        ended = continue_document_ids(model, LAYOUT, PROMPTS, SAMPLE, 20)
        assert all(r.tokens == [LAYOUT.eos_id] and r.stop == "eos" for r in ended)
    finally:
        handle.remove()


def test_a_seeded_run_repeats_and_does_not_depend_on_the_batch(model, boost_logits):
    handle = boost_logits(model, columns(LAYOUT.boi_id), 3.0)
    try:
        for cfg in (1.0, 2.0):
            sampling = replace(SAMPLE, cfg_scale=cfg, seed=7)
            first = continue_document_ids(model, LAYOUT, PROMPTS, sampling, 40)
            again = continue_document_ids(model, LAYOUT, PROMPTS, replace(sampling, batch_size=1), 40)  # fmt: skip
            assert again == first
            assert sum(r.images for r in first) > 0
            other = continue_document_ids(model, LAYOUT, PROMPTS, replace(sampling, seed=8), 40)
            assert other != first
    finally:
        handle.remove()


def test_cfg_guides_the_codes_only(model, boost_logits):
    handle = boost_logits(model, columns(LAYOUT.boi_id), 50.0)  # an image first, always
    try:
        greedy = replace(SAMPLE, do_sample=False)
        plain = continue_document_ids(model, LAYOUT, PROMPTS, greedy, HW + 2, max_images=1)
        guided = continue_document_ids(
            model, LAYOUT, PROMPTS, replace(greedy, cfg_scale=3.0), HW + 2, max_images=1
        )
    finally:
        handle.remove()
    assert all(r.images == 1 for r in plain + guided)
    assert [r.tokens for r in plain] != [r.tokens for r in guided]
    # scale 0 is the unconditional branch alone: the same codes for every prompt
    handle = boost_logits(model, columns(LAYOUT.boi_id), 50.0)
    try:
        uncond = continue_document_ids(
            model, LAYOUT, PROMPTS, replace(greedy, cfg_scale=0.0), HW + 2, max_images=1
        )
    finally:
        handle.remove()
    assert len({tuple(r.tokens) for r in uncond}) == 1


def test_the_previous_image_branch_is_the_document_up_to_its_last_image(model, boost_logits):
    """`unconditional="previous_image"`: at scale 0 (the branch alone) a prompt with an image draws
    what the document cut after that image's eoi draws unguided; one without, the caption-dropped
    branch's codes."""
    greedy = replace(SAMPLE, do_sample=False)
    cut = PROMPTS[2][: PROMPTS[2].index(LAYOUT.eoi_id) + 1]  # [eos, 42, boi, codes, eoi]
    handle = boost_logits(model, columns(LAYOUT.boi_id), 50.0)  # an image first, always
    try:
        branch = continue_document_ids(
            model, LAYOUT, PROMPTS, replace(greedy, cfg_scale=0.0), HW + 2, 1, "previous_image"
        )
        dropped = continue_document_ids(
            model, LAYOUT, PROMPTS, replace(greedy, cfg_scale=0.0), HW + 2, 1
        )
        (unguided_cut,) = continue_document_ids(model, LAYOUT, [cut], greedy, HW + 2, 1)
    finally:
        handle.remove()
    assert branch[2].tokens == unguided_cut.tokens != dropped[2].tokens
    assert [branch[i].tokens for i in (0, 1, 3)] == [dropped[i].tokens for i in (0, 1, 3)]
    with pytest.raises(ValueError, match="unconditional branch 'none' is unknown"):
        continue_document_ids(model, LAYOUT, PROMPTS, greedy, HW + 2, 1, "none")


def test_prompts_are_checked(model):
    with pytest.raises(ValueError, match="ends inside an image.*after 0 of 9"):
        continue_document_ids(model, LAYOUT, [[99, 5, LAYOUT.boi_id]], SAMPLE)
    with pytest.raises(ValueError, match="prompt 1: .*ends inside an image.*after 2 of 9"):
        continue_document_ids(model, LAYOUT, [[99], [99, 100, 102, 103]], SAMPLE)
    for bad, words in [
        ([99, 101], "closes an image it did not open"),
        ([99, 102], "image tokens outside"),
        ([99, 100, *[102] * 8, 101], "has 8 codes"),
        ([99, 100, 5], "holds a text token"),
        ([99, 500], "outside the vocabulary"),
    ]:
        with pytest.raises(ValueError, match=words):
            check_document_prompt(bad, LAYOUT, N_POSITIONS)
    with pytest.raises(SequenceLengthError, match="n_positions=128 leaves no room"):
        continue_document_ids(model, LAYOUT, [[99] * N_POSITIONS], SAMPLE)


class _Ids:
    def encode_text(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]


def test_the_prompt_is_a_training_document_without_its_last_eos():
    codes = torch.arange(9).reshape(3, 3)
    segments = ["5 6", codes, "7"]
    built = build_document(segments, LAYOUT, _Ids()).input_ids
    assert document_prompt(segments, LAYOUT, _Ids()) == built[:-1]
    parts = split_continuation(built[1:], LAYOUT)
    assert parts[0] == [5, 6] and torch.equal(parts[1], codes) and parts[2] == [7]


DOC_LAYOUT = VocabLayout(16, (3, 3), 100, ("<|boi|>", "<|eoi|>", "<|doc|>"))  # doc 102


def test_a_document_model_opens_prompts_with_doc_and_never_writes_it(tiny_gpt2, boost_logits):
    """An LM trained on documents: its prompts are `eos doc ...`, and `<|doc|>`, however likely,
    is never generated (it is not text: the text steps allow text ids and boi only)."""
    model = tiny_gpt2(DOC_LAYOUT, n_positions=N_POSITIONS)
    prompt = document_prompt(["5 6"], DOC_LAYOUT, _Ids())
    assert prompt == [99, DOC_LAYOUT.doc_id, 5, 6]
    handle = boost_logits(model, columns(DOC_LAYOUT.doc_id), 40.0)
    try:
        for seed in range(4):
            sampling = replace(SAMPLE, seed=seed)
            for run in continue_document_ids(model, DOC_LAYOUT, [prompt], sampling, 30):
                assert DOC_LAYOUT.doc_id not in run.tokens, run.tokens
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# the CLI and its files, on the tiny pipeline of tests/fixtures (8x8 codes, n_positions 96)


@pytest.fixture()
def images_often(monkeypatch):
    """Pipelines load with a large bias on the `<|boi|>` logit (images open at once)."""
    load = Pipeline.from_pretrained.__func__

    def biased(cls, path, device="cpu"):
        pipe = load(cls, path, device)
        boi = torch.zeros(pipe.lm.lm_head.weight.shape[0])
        boi[pipe.layout.boi_id] = 30.0
        pipe.lm.lm_head.register_forward_hook(lambda _m, _i, out: out + boi.to(out.dtype))
        return pipe

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(biased))


def test_markdown_and_json_agree(tmp_path, cli_in_process, images_often):
    shutil.copy(FIXTURES / "image.png", tmp_path / "cat.png")
    docs = tmp_path / "docs.jsonl"
    lines = [
        {"segments": [{"text": "A red circle"}]},
        {"segments": [{"text": "A square:"}, {"image": "cat.png"}, {"text": " and"}]},
    ]
    docs.write_text("".join(json.dumps(d) + "\n" for d in lines))
    out = tmp_path / "out"
    args = ["generate", "--model", str(FIXTURES / "lm_run"), "--document", str(docs)]
    result = cli_in_process(*args, "--seed", "3", "--cfg", "2", "--out", str(out))
    assert "2 document(s), 2 image(s) written" in result.stderr
    records = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["000.md", "001.md"]
    assert records[0]["prompt"] == f"{docs}:1" and records[0]["images"] == 1
    assert records[0]["segments"][0] == {"image": "000_1.png"}
    assert records[1]["images"] == 0 and records[1]["stop"] == "n_positions"  # no room left
    assert records[1]["prompt_tokens"] == 1 + 3 + 66 + 1  # eos, "A square:", the image, " and"
    for r in records:
        assert r["stop"] in ("eos", "max_new_tokens", "max_images", "n_positions")
        assert r["prompt_tokens"] + r["new_tokens"] <= 96
        md = (out / r["file"]).read_text()
        generated = md.split("<!-- generated from here -->")[1]
        count = itertools.count(1)
        expected = "".join(
            s["text"] if "text" in s else f"\n\n![image {next(count)}]({s['image']})\n\n"
            for s in r["segments"]
        )
        assert generated.strip() == expected.strip()
        for name in re.findall(r"\]\((.*?)\)", md):
            assert (out / name).is_file()
    assert (out / "001_p1.png").is_file()  # the prompt's image, as the model read it
    again = cli_in_process(*args, "--seed", "3", "--cfg", "2", "--out", str(tmp_path / "again"))
    assert again.returncode == 0
    assert (tmp_path / "again/documents.jsonl").read_text() == (out / "documents.jsonl").read_text()
    # existing files are never replaced
    taken = cli_in_process(*args, "--out", str(out), check=False)
    assert "already exists" in taken.stderr


def test_cli_takes_the_cfg_branch_to_continue_documents(tmp_path, cli_in_process, monkeypatch):
    from vqgpt import cli
    from vqgpt.lm import infer
    from vqgpt.lm.continuation import UNCONDITIONAL_BRANCHES

    assert cli.UNCONDITIONAL_CHOICES == UNCONDITIONAL_BRANCHES
    seen, real = [], infer.continue_documents

    def spy(*args, **kwargs):  # the real continuation, its branch recorded
        seen.append(inspect.signature(real).bind(*args, **kwargs).arguments.get("unconditional"))
        return real(*args, **kwargs)

    monkeypatch.setattr(infer, "continue_documents", spy)
    args = ["generate", "--model", str(FIXTURES / "lm_run"), "--document", "A red circle"]
    args += ["--max-new-tokens", "2", "--cfg", "2"]
    for k, branch in enumerate([[], ["--cfg-unconditional", "previous_image"]]):
        result = cli_in_process(*args, *branch, "--out", str(tmp_path / str(k)))
        assert (tmp_path / str(k) / "document.md").is_file(), result.stderr
    assert seen == ["caption_dropped", "previous_image"]


def test_cli_refusals_are_one_line(tmp_path, cli_in_process, error_line):
    model = ["generate", "--model", str(FIXTURES / "lm_run"), "--out", str(tmp_path / "o")]
    for given, words in [
        (["--document", "A cat <|boi|>"], "prompt 0: the prompt ends inside an image"),
        (["--document", "A <|boi|><|img_00001|><|img_00002|>"], "after 2 of 64 codes"),
        (["--document", " red" * 200], "n_positions=96 leaves no room"),
        (["--document", "missing.jsonl"], "--document missing.jsonl: no such file"),
        (["--document", "a", "a cat"], "leave out captions"),
        (["--document", "a", "--max-images", "-1"], "max_images >= 0"),
        (["a cat", "--max-images", "2"], "--max-images is for --document"),
        (
            ["a cat", "--cfg-unconditional", "previous_image"],
            "--cfg-unconditional is for --document",
        ),
    ]:
        result = cli_in_process(*model, *given, check=False)
        assert words in error_line(result, "generate"), given
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"segments": [{"image": "nope.png"}]}\n')
    result = cli_in_process(*model, "--document", str(bad), check=False)
    assert f"{bad}:1: segment 0: {tmp_path / 'nope.png'}: missing file" in error_line(result)
    assert not (tmp_path / "o").exists()


def test_cached_batch_equals_the_uncached_reference(model, boost_logits, reference_document):
    handle = boost_logits(model, columns(LAYOUT.boi_id), 3.0)
    try:
        greedy = replace(SAMPLE, do_sample=False)
        runs = continue_document_ids(model, LAYOUT, PROMPTS, greedy, 50, max_images=10)
        expected = [reference_document(model, LAYOUT, p, 50) for p in PROMPTS]
    finally:
        handle.remove()
    assert [r.tokens for r in runs] == expected
    assert sum(r.images for r in runs) > 0
