"""Calibration under DDP: 2 CPU processes (gloo) end with the same amax, equal to one process
calibrating on all the data (statistics reduced: max for max, histograms summed for the others)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from qatsparse.quantization import HistogramCalibrator, QuantConfig, calibrate, quantize_model, quantizers

CALIBRATORS = ("max", "entropy", "percentile", "mse")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(64, 3))


def _data() -> torch.Tensor:
    x = torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    x[40] *= 5  # rank 1 holds the largest values: the ranks' ranges differ
    return x


def _calibrate_all(batches: list[torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name in CALIBRATORS:
        m = _model()
        quantize_model(m, QuantConfig(calibrator=name))
        calibrate(m, batches, m)
        out[name] = {n: q.amax.clone() for n, q in quantizers(m).items()}
    return out


def _worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = _data()[rank * 32 : (rank + 1) * 32]
        result = {"model": _calibrate_all(list(shard.split(8)))}
        # streaming histograms (no first pass): the ranks' bin widths differ and are aligned in reduce()
        c = HistogramCalibrator("percentile", percentile=99.0)
        for b in (shard.abs() + rank).split(8):
            c.collect(b)
        result["stream_width_before"] = c.width
        c.reduce()
        counts, edges = c.histogram()
        result["stream"] = (counts, edges, float(c.compute_amax()))
        torch.save(result, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    path = str(tmp_path_factory.mktemp("ddp") / "out")
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    return [torch.load(f"{path}.{r}", weights_only=False) for r in range(2)]


def test_every_rank_ends_with_the_same_amax(ddp_results):
    r0, r1 = (r["model"] for r in ddp_results)
    for name in CALIBRATORS:
        for q in r0[name]:
            assert torch.equal(r0[name][q], r1[name][q]), (name, q)


def test_ddp_amax_equals_single_process_on_all_data(ddp_results):
    # 4 batches of 8 per rank == the same 8 batches in one process: the reduced statistics are exact.
    single = _calibrate_all(list(_data().split(8)))
    for name in CALIBRATORS:
        for q, amax in ddp_results[0]["model"][name].items():
            assert torch.allclose(amax, single[name][q], rtol=1e-6, atol=0), (name, q, amax, single[name][q])


def test_streaming_histograms_are_aligned_then_summed(ddp_results):
    (c0, e0, a0), (c1, e1, a1) = (r["stream"] for r in ddp_results)
    assert ddp_results[0]["stream_width_before"] != ddp_results[1]["stream_width_before"]
    assert (c0 == c1).all() and (e0 == e1).all() and a0 == a1
    assert c0.sum() == pytest.approx(64 * 3 * 6 * 6)  # all values of both ranks, none lost
