"""FSDP (Lightning's FSDPStrategy) with 2 CPU processes over gloo: masks and amax identical on every rank, each
rank's shard 2:4, resume bit-identical from full and sharded checkpoints, and the fit-end export equal to a
single-process export of the same weights -- with inner FSDP units and activation checkpointing (fits A, B) and
with the whole module one unit (C, D). One launch of tests/fsdp_worker.py runs every fit (~30 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.strategies import FSDPStrategy
from torch import nn

from qatsparse.sharding import check_full_state_dict, check_strategy, check_unsharded
from qatsparse.sparsity import compute_2to4_mask

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fsdp_worker.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_every_rank_holds_the_same_masks_and_amax(fsdp):
    _, (r0, r1) = fsdp
    assert r0["A"]["wrappers"] == ["CheckpointWrapper", "FullyShardedDataParallel"]  # inner units, checkpointing
    assert r0["C"]["wrappers"] == []  # the whole module one FSDP unit
    for fit in "ABCD":
        assert sorted(r0[fit]["masks"]) == ["conv", "fc"]
        assert _equal(r0[fit]["masks"], r1[fit]["masks"]), fit
        assert _equal(r0[fit]["amax"], r1[fit]["amax"]), fit
        assert _equal(r0[fit]["full"], r1[fit]["full"]), fit
    assert len(r0["A"]["amax"]) == 4 and all(torch.isfinite(a).all() for a in r0["A"]["amax"].values())
    assert r0["A"]["amax"]["conv.weight_quantizer"].shape == (16,)  # per channel, sized by the full weight


def test_each_rank_keeps_its_shard_2to4(fsdp):
    _, (r0, r1) = fsdp
    for fit in "ABCD":
        for name, mask in r0[fit]["masks"].items():
            full = r0[fit]["full"][f"{name}.weight"]
            assert (full[~mask] == 0).all() and (full[mask] != 0).all(), (fit, name)
            shards = [r[fit]["shards"][f"{name}.weight"] for r in (r0, r1)]
            assert shards[0].dim() == 1  # flat slices: the weight really is sharded
            assert torch.equal(torch.cat(shards), full.flatten())
    conv = [r["A"]["shards"]["conv.weight"].numel() for r in (r0, r1)]
    assert min(conv) > 0  # the conv weight is split over both ranks: each cut its own part of the mask


def test_sparsity_metrics_from_shards_equal_those_of_the_full_weights(fsdp):
    _, (r0, r1) = fsdp
    for fit in "ABCD":
        assert r0[fit]["metrics_sharded"] == r0[fit]["metrics_full"] == r1[fit]["metrics_sharded"], fit
    assert r0["A"]["metrics_full"]["qatsparse/sparsity/layer_zero_share/conv"] == 0.5


def test_masks_come_from_the_full_dense_weights(fsdp):
    out, (r0, _) = fsdp
    ckpt = torch.load(out / "export_A" / "model.ckpt", weights_only=False)
    ref = next(v for k, v in ckpt["callbacks"].items() if k.startswith("TensorRTExport"))["reference_state"]
    for name, mask in r0["A"]["masks"].items():
        assert torch.equal(compute_2to4_mask(ref[f"{name}.weight"]), mask), name


@pytest.mark.parametrize(("full", "resumed"), [("A", "B"), ("C", "D")], ids=["full-checkpoint", "sharded-checkpoint"])
def test_resume_is_bit_identical(fsdp, full, resumed):
    _, (r0, r1) = fsdp
    for r in (r0, r1):
        for what in ("masks", "amax", "full", "shards"):
            assert _equal(r[full][what], r[resumed][what]), (full, resumed, what)


def test_fit_end_export_equals_a_single_process_export(fsdp):
    out, _ = fsdp
    a, s = out / "export_A", out / "export_single"
    for f in ("model.onnx", "model_fp32.onnx", "tensorrt/inputs.npz", "tensorrt/outputs_onnxruntime.npz"):
        assert (a / f).read_bytes() == (s / f).read_bytes(), f
    ra, rs = (json.loads((d / "report.json").read_text()) for d in (a, s))
    assert ra["passed"] and rs["passed"]
    for key in ("agreement", "outputs"):
        assert ra[key] == rs[key], key
    fit_only = {"kept_magnitude", "permutation"}  # what the callback measured while pruning, not in model.ckpt
    assert set(rs["sparsity"]) <= set(ra["sparsity"]) and set(ra["sparsity"]) - set(rs["sparsity"]) <= fit_only
    assert {k: v for k, v in ra["sparsity"].items() if k not in fit_only} == rs["sparsity"]
    assert {k: v["metrics"] for k, v in ra["backends"].items()} == {k: v["metrics"] for k, v in rs["backends"].items()}
    settings = ("start_step", "calib_batches")  # the callback's arguments, not the model
    assert {k: v for k, v in ra["quantization"].items() if k not in settings} == {
        k: v for k, v in rs["quantization"].items() if k not in settings
    }


def test_mixed_precision_with_buffers_in_fp16(fsdp):
    _, (r0, r1) = fsdp
    assert r0["F"]["bn_dtype"] == "torch.float16"  # FSDP keeps the buffers in FP16: the case that broke
    assert r0["F"]["steps"] == 4 and r1["F"]["steps"] == 4
    assert len(r0["F"]["amax"]) == 4 and all(torch.isfinite(a).all() for a in r0["F"]["amax"].values())
    assert _equal(r0["F"]["amax"], r1["F"]["amax"])


def test_unsupported_setting_stops_before_step_0(fsdp):
    _, ranks = fsdp
    for r in ranks:
        assert r["E"]["steps"] == []
        assert "TensorRTExport with FSDPStrategy(state_dict_type='sharded')" in r["E"]["error"]
        assert "use FSDPStrategy(state_dict_type='full')" in r["E"]["error"]


def test_unsupported_settings_name_the_fix():
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="use strategy='fsdp'"):
        check_strategy(SimpleNamespace(strategy=type("ModelParallelStrategy", (), {})()), net)
    with pytest.raises(ValueError, match="leave use_orig_params=True"):
        check_strategy(SimpleNamespace(strategy=FSDPStrategy(use_orig_params=False)), net)
    check_strategy(SimpleNamespace(strategy=FSDPStrategy(auto_wrap_policy={nn.Linear})), net)  # supported
    sharded = SimpleNamespace(strategy=FSDPStrategy(state_dict_type="sharded"))
    for owner in ("TensorRTExport", "QuantizationAwareTraining"):
        with pytest.raises(ValueError, match=rf"{owner} with .*use FSDPStrategy\(state_dict_type='full'\)"):
            check_full_state_dict(sharded, owner)
    check_full_state_dict(SimpleNamespace(strategy=FSDPStrategy()), "TensorRTExport")
    with pytest.raises(ValueError, match="use permute=False or strategy='ddp'"):
        check_unsharded(SimpleNamespace(strategy=FSDPStrategy()), "TwoFourSparsity(permute=True)",
                        "use permute=False or strategy='ddp'")  # fmt: skip
