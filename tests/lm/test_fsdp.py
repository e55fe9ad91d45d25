"""Stage two under FSDP: the loss inside the wrapped forward gives the unsharded loss and
gradients, on 2 CPU processes (gloo) with torch's own FSDP2 (`fully_shard`) and FSDP1.

Accelerate's FSDP plugin needs a GPU, so these run the module the trainer wraps (`LMWithLoss`)
through torch's API directly; on a machine without GPUs the trainer refuses an FSDP launch config
(tests/test_launch_configs.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "dist_scripts" / "fsdp_lm_loss.py"
MODES = ["split", "full"]
STRATEGIES = ["fsdp2", "fsdp2-keep", "fsdp1-full", "fsdp1-grad-op"]


@pytest.fixture(scope="module")
def sharded_records(tmp_path_factory, run_command, new_accelerate_launcher) -> Path:
    """Every (mode, strategy) pair in one 2-process launch (a launch costs more than the step):
    the prefix of the per-pair, per-rank records."""
    out = tmp_path_factory.mktemp("fsdp_loss") / "result"
    launcher = new_accelerate_launcher()
    run_command([*launcher, str(SCRIPT), ",".join(MODES), ",".join(STRATEGIES), str(out)],
                timeout=300)  # fmt: skip
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", MODES)
def test_sharded_loss_and_gradients_equal_one_unsharded_process(sharded_records, mode, strategy):
    for rank in range(2):
        record = json.loads(Path(f"{sharded_records}.{mode}.{strategy}.{rank}.json").read_text())
        sharded, reference = record["loss"]
        assert sharded == pytest.approx(reference, rel=1e-5)
        assert record["params"] > 10  # every parameter was compared
        assert record["max_grad_diff"] <= 1e-5 * max(record["max_grad"], 1.0), record


TRAIN_SCRIPT = Path(__file__).parent / "dist_scripts" / "fsdp_lm_train.py"


@pytest.mark.slow
def test_fsdp2_trains_like_one_process_resumes_from_both_checkpoints_and_samples(
    tmp_path, run_command, run_cli, accelerate_launcher, tiny_tokenizer_run
):
    out = tmp_path / "fsdp"
    image_dir = tiny_tokenizer_run / "final"
    run_command([*accelerate_launcher, str(TRAIN_SCRIPT), str(image_dir), str(out)], timeout=300)
    record = json.loads((out / "result.json").read_text())
    reference, fsdp = record["reference"], record["fsdp"]
    assert [lr for _, lr in fsdp] == [lr for _, lr in reference]  # the same schedule, exactly
    for (loss, _), (ref, _) in zip(fsdp, reference, strict=True):
        assert loss == pytest.approx(ref, rel=1e-5)
    # resumed from step 3, sharded (one file per rank) or full: bit-exact continuations
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(record["shard_files"])
    assert record["resumed_sharded"] == fsdp[3:]
    assert record["resumed_full"] == fsdp[3:]
    # AdamW's first steps magnify the last-bit differences of the reduction order
    assert record["max_weight_diff"] < 1e-3

    # the gathered final model is a pipeline like any other: load it, sample, caption
    run_cli(
        "generate",
        "--model",
        str(out / "final"),
        "--out",
        str(tmp_path / "gen"),
        "-n",
        "2",
        "a red circle",
    )
    assert len(list((tmp_path / "gen").glob("000_*.png"))) == 2
    images = sorted(map(str, (tmp_path / "gen").glob("000_*.png")))
    result = run_cli("caption", "--model", str(out / "final"), *images)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in records] == images
    assert all(r["caption"].strip() for r in records)  # a caption for each image
