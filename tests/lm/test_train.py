"""Stage-two training: a real run, a killed run that resumes, a 2-process run that saves once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from vqgpt.lm.pipeline import Pipeline
from vqgpt.lm.pretokenize import read_split_info
from vqgpt.tokenizer.codec import load_tokenizer_model
from vqgpt.training import read_metrics


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run, "train")}


@pytest.fixture(scope="module")
def lm_run(tiny_tokenizer_run, tmp_path_factory, run_cli, tiny_lm_recipe, write_yaml):
    root = tmp_path_factory.mktemp("lm")
    out = root / "run"
    recipe = tiny_lm_recipe(tiny_tokenizer_run, out, root / "codes", train=dict(eval_every=3))
    cfg = write_yaml(root / "r.yaml", recipe)
    # issue 18, second round: status lines (pretokenize's summary, the eval lines) on stderr
    # only; stdout carries data, and these commands have none
    result = run_cli("pretokenize", "--config", str(cfg))
    assert result.stdout == "" and "(written)" in result.stderr
    result = run_cli("train-lm", "--config", str(cfg))
    assert result.stdout == "" and "step 3: " in result.stderr and "pipeline saved" in result.stderr
    return out


def test_run_saves_a_loadable_pipeline_and_reports_eval_per_task(lm_run):
    final = lm_run / "final"
    pipe = Pipeline.from_pretrained(final)
    assert pipe.layout.grid == pipe.image_tokenizer.grid
    summary = json.loads((final / "eval.json").read_text())
    assert summary["step"] == 6
    for key in ("full/t2i", "full/caption", "split/t2i/image", "unigram_full/caption"):
        assert summary[key] > 0, key
    # the split normalisation is over fewer rows: never worse than the full one
    assert summary["split/t2i/image"] <= summary["full/t2i/image"] + 1e-6
    train = read_metrics(lm_run, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 for r in train)


def test_killed_run_resumes_with_the_same_next_step_loss(
    lm_run, tiny_tokenizer_run, tmp_path, kill_after_checkpoint, run_cli, tiny_lm_recipe, write_yaml
):
    out = tmp_path / "run"
    recipe = tiny_lm_recipe(tiny_tokenizer_run, out, tmp_path / "codes", train=dict(save_every=1))
    cfg = write_yaml(tmp_path / "r.yaml", recipe)
    resumed_from = kill_after_checkpoint(["train-lm", "--config", str(cfg)], out)
    assert 2 <= resumed_from < 6, "the kill came too late to test a resume"
    result = run_cli("train-lm", "--config", str(cfg), "--resume", "latest")
    assert "resumed from" in result.stderr
    reference, resumed = losses(lm_run), losses(out)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(resumed_from + 1, 7):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-7), step


def test_a_resume_with_another_image_tokenizer_is_refused_before_its_codes_change(
    lm_run, tiny_tokenizer_run, tmp_path, run_cli, error_line, tiny_lm_recipe, write_yaml
):
    out, codes = tmp_path / "run", tmp_path / "codes"  # copies: the fixture's run stays as it is
    shutil.copytree(lm_run, out)
    shutil.copytree(lm_run.parent / "codes", codes)
    before = read_split_info(codes, "train")
    record = json.loads((out / "image_tokenizer.json").read_text())
    assert record["fingerprint"] == before.tokenizer_fingerprint
    # the run's tokenizer trained again: the same architecture, other weights
    model = load_tokenizer_model(tiny_tokenizer_run)
    model.quantizer.codebooks[0].embed.data = model.quantizer.codebooks[0].embed.data.flip(0)
    model.save_pretrained(tmp_path / "tok2")
    cfg = write_yaml(tmp_path / "r.yaml", tiny_lm_recipe(tmp_path / "tok2", out, codes))
    result = run_cli("train-lm", "--config", str(cfg), "--resume", "latest", check=False)
    line = error_line(result, "train-lm")
    assert "was trained on the codes of another image tokenizer" in line and "tok2" in line
    assert read_split_info(codes, "train") == before  # nothing was encoded again
    # the same tokenizer resumes (the run is complete: nothing to do but save)
    cfg = write_yaml(tmp_path / "r.yaml", tiny_lm_recipe(tiny_tokenizer_run, out, codes))
    assert "resumed from" in run_cli("train-lm", "--config", str(cfg), "--resume", "latest").stderr


def test_an_epoch_smaller_than_one_step_is_a_config_error(
    lm_run, tiny_tokenizer_run, tmp_path, run_cli, tiny_lm_recipe, write_yaml
):
    # 64 images pack into fewer windows than one step of 64: found while the epoch is built
    recipe = tiny_lm_recipe(
        tiny_tokenizer_run, tmp_path / "run", lm_run.parent / "codes", train=dict(batch_size=64)
    )
    cfg = write_yaml(tmp_path / "r.yaml", recipe)
    result = run_cli("train-lm", "--config", str(cfg), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    *status, line = result.stderr.strip().splitlines()  # status: the codes are cached already
    assert line.startswith("vqgpt train-lm: error: one epoch of 64 examples packs into fewer ")
    assert "than one optimizer step of train.batch_size=64" in line
    assert status and all("already pretokenized" in s for s in status)


def test_generate_and_caption_commands_write_their_files(lm_run, tmp_path, run_cli):
    listed = ["a small red circle at the top", "a large blue square at the left"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{listed[0]}\n\n{listed[1]}\n")  # the blank line is skipped
    first = "a large green triangle at the center"
    out = tmp_path / "gen"
    args = ["--model", str(lm_run), first, "--prompts", str(prompts), "-n", "2", "--cfg", "2"]
    result = run_cli("generate", *args, "--rerank", "2", "--seed", "3", "--out", str(out))
    assert "6 image(s) written" in result.stderr and result.stdout == ""
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [first] * 2 + [listed[0]] * 2 + [listed[1]] * 2
    assert len({r["file"] for r in rows}) == 6  # a file per image, none shared
    size = Pipeline.from_pretrained(lm_run).image_tokenizer.config.arch.image_size
    assert all(Image.open(out / r["file"]).size == (size, size) for r in rows)
    assert (out / "grid.png").is_file()

    (out / "broken.png").write_bytes(b"not a png")
    captions = tmp_path / "captions.jsonl"
    result = run_cli(
        "caption", "--model", str(lm_run), str(out), "--out", str(captions), "--rerank", "2"
    )
    records = [json.loads(line) for line in captions.read_text().splitlines()]
    assert result.stdout == ""  # --out takes the records instead of stdout
    assert [Path(r["file"]).name for r in records] == sorted(r["file"] for r in rows) + ["grid.png"]
    assert all(isinstance(r["caption"], str) for r in records)
    assert "7 image(s) captioned, 1 skipped (not an image: 1)" in result.stderr
    assert f"skipped {out / 'broken.png'}: not an image" in result.stderr


def test_caption_stdout_is_json_lines_and_a_max_length_rerank_fits(lm_run, tmp_path, run_cli):
    # issue 18: fault 6 (data on stdout, messages on stderr) and fault 9 (`caption --rerank 2
    # --max-new-tokens` past the budget re-scored one token past the position table)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), (220, 20, 20)).save(folder / "red.png")
    Image.new("RGB", (48, 40), (20, 20, 220)).save(folder / "blue.jpg")
    pipe = Pipeline.from_pretrained(lm_run)
    budget = pipe.lm.config.n_positions - pipe.layout.tokens_per_image - 4
    model = ["--model", str(lm_run)]
    for options in (["--rerank", "2"], ["--beams", "4", "--rerank", "3"], ["--sample"]):
        result = run_cli("caption", *model, str(folder), "--max-new-tokens", "999", *options)
        records = [json.loads(line) for line in result.stdout.splitlines()]
        assert [Path(r["file"]).name for r in records] == ["blue.jpg", "red.png"], options
        assert all(isinstance(r["caption"], str) for r in records)
        assert f"vqgpt caption: note: max_new_tokens=999 capped at {budget}" in result.stderr
        assert result.stderr.count("capped at") == 1, result.stderr  # one note per call
        assert "2 image(s) captioned" in result.stderr


def test_commands_that_produce_nothing_fail(error_line, lm_run, tmp_path, run_cli, cli_in_process):
    # issue 18, fault 7: no images, nothing readable, only blank prompts: exit 2, one line
    model = ["--model", str(lm_run)]
    empty = tmp_path / "empty"
    empty.mkdir()
    line = error_line(run_cli("caption", *model, str(empty), check=False), "caption")
    assert f"no image files in {empty}" in line
    (empty / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    line = error_line(cli_in_process("caption", *model, str(empty), check=False), "caption")
    assert "none of the 1 image(s) could be read" in line and "bad.png" in line
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    for prompts in (["", "  "], ["--prompts", str(blank)]):
        result = cli_in_process(
            "generate", *model, *prompts, "--out", str(tmp_path / "g"), check=False
        )
        assert "no prompts (every prompt given is blank)" in error_line(result, "generate")
    assert not (tmp_path / "g").exists()
    # fault 5: a second generate into the same folder replaces nothing
    out = tmp_path / "gen"
    run_cli("generate", *model, "a red circle", "", "-n", "1", "--out", str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = run_cli("generate", *model, "a blue square", "--out", str(out), check=False)
    assert "000_0.png already exists" in error_line(again, "generate")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_eval_prints_only_its_report_on_stdout(
    error_line, lm_run, tmp_path, run_cli, cli_in_process
):
    # issue 18: fault 6 (the report is the data; nothing else on stdout) and fault 7 (no image)
    out = tmp_path / "eval"
    model = ["--model", str(lm_run)]
    result = run_cli("eval", *model, "--num-images", "2", "--out", str(out))
    assert result.stdout == (out / "report.md").read_text() + "\n"
    assert "#" not in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bad.png").write_bytes(b"")
    again = run_cli("eval", *model, "--data", str(empty), "--out", str(out), check=False)
    assert "no readable images" in error_line(again, "eval")
    # issue 18, second round: the report's grids must not land among (or replace) the data
    for inside in (empty, empty / "report"):
        again = cli_in_process(
            "eval", *model, "--data", str(empty), "--out", str(inside), check=False
        )
        assert f"--out {inside} is inside --data {empty}" in error_line(again, "eval")
    assert sorted(p.name for p in empty.iterdir()) == ["bad.png"]


def test_an_output_file_is_never_one_of_the_inputs(
    error_line, lm_run, tmp_path, run_cli, cli_in_process
):
    # issue 18, second round: `caption d --out d/2.png` replaced the input image with JSON
    folder = tmp_path / "d"
    folder.mkdir()
    for name in ("1.png", "2.png"):
        Image.new("RGB", (32, 32), (20, 20, 220)).save(folder / name)
    (tmp_path / "alias.png").symlink_to(folder / "1.png")
    before = {p: p.read_bytes() for p in folder.iterdir()}
    model = ["--model", str(lm_run)]
    cases = [
        ([str(folder)], folder / "2.png"),
        ([str(folder / "1.png")], folder / "1.png"),
        ([str(folder)], tmp_path / "alias.png"),
    ]
    for i, (inputs, out) in enumerate(cases):
        run = run_cli if i == 0 else cli_in_process
        result = run("caption", *model, *inputs, "--out", str(out), check=False)
        assert f"--out {out} is the input" in error_line(result, "caption")
        assert result.stdout == ""
    assert {p: p.read_bytes() for p in folder.iterdir()} == before


def test_a_prompt_file_splits_at_line_ends_only(lm_run, tmp_path, cli_in_process):
    # issue 18, second round: str.splitlines split a prompt at U+2028 (and \x85, \x0c, \x1c...)
    from vqgpt.lm.infer import read_prompts

    odd = ["a red\u2028circle", "a blue\x85square", "a green\x0ctriangle", "a red\x1csquare"]
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(("\r\n".join(odd[:2]) + "\r" + "\n".join(odd[2:]) + "\n").encode())
    assert read_prompts([], str(prompts)) == odd
    out = tmp_path / "gen"
    args = ["--model", str(lm_run), "--prompts", str(prompts), "-n", "1", "--out", str(out)]
    result = cli_in_process("generate", *args)
    assert "4 image(s) written" in result.stderr
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().split("\n") if line]
    assert [r["prompt"] for r in rows] == odd


def test_a_run_with_documents_trains_on_them_and_reports_their_loss(
    tiny_tokenizer_run, tmp_path, run_cli, tiny_lm_recipe, write_yaml
):
    from vqgpt.data.shapes import ShapesConfig, shapes_dataset

    (tmp_path / "imgs").mkdir()
    shapes = ShapesConfig(num_images=4, num_test_images=2, image_size=32)
    for i, row in enumerate(shapes_dataset(shapes, "train")):
        row["image"].save(tmp_path / "imgs" / f"{i}.png")
    for split, n in (("train", 12), ("test", 3)):
        lines = [
            {
                "segments": [
                    {"text": f"Story {i}: first"},
                    {"image": f"imgs/{i % 4}.png"},
                    {"text": " then"},
                    {"image": f"imgs/{(i + 1) % 4}.png"},
                ]
            }  # fmt: skip
            for i in range(n)
        ]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "run"
    recipe = tiny_lm_recipe(
        tiny_tokenizer_run,
        out,
        tmp_path / "codes",
        train=dict(max_steps=2, eval_every=2, save_every=0),
        sequences=dict(document_ratio=0.3, image_positions="shared"),
        eval=dict(max_documents=3),
    )
    recipe["data"]["documents"] = dict(source=str(tmp_path))
    result = run_cli("train-lm", "--config", str(write_yaml(tmp_path / "r.yaml", recipe)))
    assert "pretokenize documents-train: 12 rows" in result.stderr
    eval_line = next(x for x in result.stderr.splitlines() if "eval loss" in x)
    assert "document " in eval_line and "(unigram " in eval_line
    summary = json.loads((out / "final" / "eval.json").read_text())
    assert summary["full/document"] > 0 and summary["full/document/image"] > 0
    # the shared image positions are in the model's config, for every later forward of it
    config = json.loads((out / "final" / "config.json").read_text())
    layout = json.loads((out / "final" / "vqgpt_vocab.json").read_text())
    assert config["image_positions"]["offset"] == 2  # no t2i prefix: a captioning code's
    assert config["image_positions"]["code_lo"] == layout["text_vocab_size"] + len(
        layout["special_tokens"]
    )
    # ... which the exported folder's transformers generate() would ignore: export refuses
    result = run_cli("export", "--run", str(out), "--out", str(tmp_path / "x"), check=False)
    assert result.returncode == 2 and "sequences.image_positions=shared" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()


def test_codebook_init_starts_the_image_rows_from_the_tokenizers_codes(
    tiny_tokenizer_run, tmp_path, run_cli, tiny_lm_recipe, write_yaml
):
    import torch
    from transformers import GPT2LMHeadModel

    from vqgpt.lm.model import init_image_embeddings
    from vqgpt.tokenizer.codec import load_tokenizer_model

    out = tmp_path / "run"
    recipe = tiny_lm_recipe(
        tiny_tokenizer_run,
        out,
        tmp_path / "codes",
        model=dict(image_embedding_init="codebook"),
        # one step of a vanishing learning rate: the saved rows are the initial ones (+- 1e-9)
        train=dict(max_steps=1, warmup_steps=0, learning_rate=1e-9, save_every=0),
        eval=dict(max_images=0),
    )
    run_cli("train-lm", "--config", str(write_yaml(tmp_path / "r.yaml", recipe)))
    saved = GPT2LMHeadModel.from_pretrained(out / "final").get_input_embeddings().weight
    layout = json.loads((out / "final" / "vqgpt_vocab.json").read_text())
    lo = layout["text_vocab_size"] + len(layout["special_tokens"])
    vectors = load_tokenizer_model(tiny_tokenizer_run).code_vectors()
    expected = GPT2LMHeadModel.from_pretrained(out / "final")  # the same init on a copy
    init_image_embeddings(expected, vectors, lo, seed=recipe["train"].get("seed", 0))
    rows = slice(lo, lo + vectors.shape[0])
    want = expected.get_input_embeddings().weight[rows]
    torch.testing.assert_close(saved[rows], want, atol=1e-6, rtol=0)
    assert not torch.allclose(saved[rows], saved[rows][torch.randperm(vectors.shape[0])])


def test_a_document_ratio_without_documents_is_a_config_error(repo_root):
    from vqgpt.config import ConfigError
    from vqgpt.lm.train import load_lm_recipe

    shapes = repo_root / "src" / "vqgpt" / "configs" / "lm" / "shapes.yaml"

    with pytest.raises(ConfigError, match="document_ratio=0.2 needs documents"):
        load_lm_recipe(shapes, ["sequences.document_ratio=0.2"])
    with pytest.raises(ConfigError, match=r"document_ratio must be in \[0, 1\)"):
        load_lm_recipe(shapes, ["sequences.document_ratio=1.0"])
    recipe = load_lm_recipe(
        shapes, ["sequences.document_ratio=0.2", "data.documents.source=docs/{split}.jsonl"]
    )
    assert recipe.data.documents.source == "docs/{split}.jsonl"
