"""The real-data GPU recipes, run for a few steps on the captioned photo fixtures (WebDataset
shards, streamed) with the models shrunk by command-line overrides only: a user's first GPU run
must not die on a data-format detail of the recipe."""

from __future__ import annotations

import json

import pytest

SHARDS = "tests/fixtures/captioned/webdataset/{00000..00002}.tar"
# overrides that only shrink the model or the run (or replace what needs the network): the data
# settings, the quantizer, the losses' structure and the schedule are the recipes' own
TOKENIZER_SHRINK = [
    "model.base_channels=8",
    "model.latent_dim=8",
    "model.norm_groups=4",
    "model.num_res_blocks=1",
    "loss.perceptual_weight=0",  # LPIPS needs its weights file (vqgpt.tokenizer.losses)
    "train.max_steps=2",
    "train.batch_size=4",
    "train.warmup_steps=1",
    "train.eval_every=0",
    "train.save_every=0",
    "train.mixed_precision=no",  # bf16 autocast on a CPU: slow, and not what is tested here
    "eval.max_images=4",
    "eval.batch_size=4",
    "data.num_workers=2",
]


@pytest.mark.slow
def test_gpu_recipes_run_on_streamed_webdataset_shards(tmp_path, repo_root, run_cli):
    from transformers import GPT2Config, GPT2LMHeadModel

    shards = str(repo_root / SHARDS)
    tok = tmp_path / "tok"
    run_cli(
        "train-tokenizer",
        "--config",
        "tokenizer/imagenet_256_gpu",
        f"data.source={shards}",
        "data.streaming=true",
        f"train.output_dir={tok}",
        *TOKENIZER_SHRINK,
        cwd=tmp_path,
    )
    config = json.loads((tok / "final" / "config.json").read_text())
    assert config["architecture"]["image_size"] == 256  # the recipe's size, 16 x 16 codes
    assert config["quantizer"]["codebook_size"] == 16384

    # `model.pretrained: gpt2` stands for a local GPT-2 folder (no network): a one-layer one
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=1024, vocab_size=50257)
    ).save_pretrained(gpt2)
    lm = tmp_path / "lm"
    result = run_cli(
        "train-lm",
        "--config",
        "lm/coco_gpt2_gpu",
        f"data.tokenizer={tok}",
        f"data.output_dir={tmp_path / 'codes'}",
        f"data.images.source={shards}",
        "data.images.text_column=text",  # img2dataset's captions: the .txt members
        f"model.pretrained={gpt2}",
        "text_tokenizer=null",  # GPT-2's BPE from the bundled files instead of the Hub
        f"train.output_dir={lm}",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.warmup_steps=1",
        "train.save_every=0",
        "train.eval_every=0",
        "train.mixed_precision=no",
        "eval.max_images=4",
        "eval.batch_size=2",
        cwd=tmp_path,
    )
    assert "train: 30 rows" in result.stderr  # every photo of the 3 shards pretokenized
    assert (lm / "final" / "model.safetensors").is_file()
    lm_config = json.loads((lm / "final" / "config.json").read_text())
    assert lm_config["n_positions"] == 1024  # the recipe's max_length, from the pretrained GPT-2
