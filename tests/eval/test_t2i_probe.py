"""scripts/t2i_probe.py: its teacher-forced figures are the library's, its K = 0 draws are plain
text-to-image, its K = h*w images are the tokenizer's reconstructions, its object cells the ones
that show an object."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def probe(load_script):
    return load_script("t2i_probe")


@pytest.fixture(scope="module")
def pipe_and_data(probe, lm_run):
    from vqgpt.lm.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(lm_run)
    return pipe, probe.held_out(pipe, str(lm_run), 6)


def test_object_cells_are_the_cells_an_object_covers(probe):
    px = np.full((64, 64, 3), 128, dtype=np.uint8)
    px[16:24, 24:32] = (220, 30, 30)  # cell (2, 3) of an 8x8 grid, all of it
    px[40:42, 0:2] = (30, 30, 220)  # 4 of cell (5, 0)'s 64 pixels: 6%, over the 5% share
    px[63, 63] = (30, 220, 30)  # 1 pixel of cell (7, 7): under it
    cells = probe.object_cells(Image.fromarray(px), (8, 8)).reshape(8, 8)
    assert cells.sum() == 2 and cells[2, 3] and cells[5, 0]


def test_teacher_forced_nll_is_the_librarys_image_logprob(probe, pipe_and_data):
    from vqgpt.lm.generate import pair_logprobs

    pipe, data = pipe_and_data
    ids = pipe.tokenizer.encode_texts(data.captions)
    expected = -pair_logprobs(pipe.lm, pipe.layout, data.codes, ids, "image").sum()
    out = probe.teacher_forced(pipe, data, temperature=0.5, batch_size=4)  # two batches, padded
    per_code = expected.item() / data.codes[0].numel() / len(data.codes)
    assert out["all"]["nll"] == pytest.approx(per_code, rel=1e-4)
    shares = out["object"]["share"] + out["background"]["share"]
    assert shares == pytest.approx(1.0) and 0 < out["all"]["top1"] <= 1


def test_no_codes_given_draws_what_text_to_image_draws(probe, pipe_and_data):
    from vqgpt.lm.generate import generate_image_codes
    from vqgpt.lm.sampling import SamplingConfig

    pipe, data = pipe_and_data
    ids = pipe.tokenizer.encode_texts(data.captions)
    sampling = SamplingConfig(temperature=0.7, cfg_scale=1.5, seed=3, batch_size=4)
    expected = generate_image_codes(pipe.lm, pipe.layout, ids, sampling)
    got = probe.half_drawn_codes(pipe, data, 0, 1.5, 0.7, seed=3, bs=4)
    assert torch.equal(got, expected.cpu())


def test_given_codes_are_kept_and_all_given_is_the_reconstruction(probe, pipe_and_data):
    pipe, data = pipe_and_data
    half = probe.half_drawn_codes(pipe, data, 20, 1.0, 0.5, seed=0, bs=4).flatten(1)
    assert torch.equal(half[:, :20], data.codes.flatten(1)[:, :20])
    full = probe.half_drawn_codes(pipe, data, data.codes[0].numel(), 1.5, 0.5, seed=0, bs=4)
    assert torch.equal(full, data.codes)
