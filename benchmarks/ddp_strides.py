"""Cost of DDP's "Grad strides do not match bucket view strides" on one GPU, paired.

Under DDP, every gradient is copied into a bucket view laid out like its parameter; a gradient with other
strides makes DDP warn once and copy through a strided view. For channels_last 1x1 conv weights under
INT8 QAT, ATen's per-channel fake-quant backward writes the gradient with contiguous strides in the
size-1 dimensions. Under DDP the qatsparse callbacks give such weights those strides before DDP wraps
the model (``qatsparse.sharding.ddp_gradient_layout``: a view of the same bytes).

This script trains ResNet-50 (channels_last, batch 128, AMP, INT8 QAT with calibrated quantizers) in
three lanes in one process, interleaved in rounds as in ``benchmarks/train_overhead.py``: ``plain``
(no DDP), ``ddp`` (DDP with one rank, weights laid out as qatsparse does) and ``ddp_unfixed`` (DDP with
the channels_last weights as they were: DDP's warning). It records which parameters' gradients had other
strides than the parameter and the warnings DDP raised, and the paired ratios ``ddp/plain``,
``ddp_unfixed/plain``, ``ddp_unfixed/ddp``. (An earlier version compared a Python ``autograd.Function``
that wrote the gradient in the weight's layout, lanes ``ddp`` and ``ddp_aten``:
benchmarks/results/ddp_strides_1gpu_h200.json.)

    python benchmarks/ddp_strides.py --out ddp_strides.json     # one GPU (NCCL, world size 1)
    python benchmarks/ddp_strides.py --quick                    # CPU smoke run (gloo, ResNet-18, 32x32)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lanes import paired_ratios, round_order
from train_overhead import environment, gpu_state

from qatsparse.quantization import QuantConfig, calibrate, quantize_model
from qatsparse.sharding import contiguous_size1_strides


class Lane:
    """One model, optimizer and scaler; ``step()`` is one AMP training step."""

    def __init__(self, name: str, model: torch.nn.Module, ddp: bool, layout: bool, device: str) -> None:
        self.name, self.device = name, device
        if layout:
            contiguous_size1_strides(model)  # what the callbacks do under DDP
        self.module = model
        self.model = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.scaler = torch.amp.GradScaler(device, enabled=device == "cuda")
        self.blocks: list[list[float]] = []
        self.mismatches: list[dict[str, Any]] = []
        self.warnings: list[str] = []

    def step(self, x: torch.Tensor, y: torch.Tensor, probe: bool = False) -> None:
        dtype = torch.float16 if self.device == "cuda" else torch.bfloat16
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.autocast(self.device, dtype=dtype, enabled=self.device == "cuda"):
                loss = F.cross_entropy(self.model(x), y)
            self.scaler.scale(loss).backward()
        if probe:
            self.warnings = sorted({str(w.message)[:160] for w in caught})
            self.mismatches = [
                {"name": n, "shape": list(p.shape), "param_stride": p.stride(), "grad_stride": p.grad.stride()}
                for n, p in self.module.named_parameters()
                if p.grad is not None and p.grad.stride() != p.stride()
            ]
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)

    def block(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.step(x, y)
                end.record()
                times.append((start, end))
            else:
                t0 = time.perf_counter()
                self.step(x, y)
                times.append(time.perf_counter() - t0)
        if self.device == "cuda":
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in times]
        return [t * 1e3 for t in times]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block-steps", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: gloo, resnet18, 32x32, batch 2")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not a.quick else "cpu"
    if a.quick:
        torch.set_num_threads(1)
        a.model, a.batch, a.image_size, a.warmup, a.rounds, a.block_steps = "resnet18", 2, 32, 1, 5, 2
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    store = dist.FileStore(tempfile.mktemp(prefix="qatsparse-ddp-"), 1)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(a.batch, 3, a.image_size, a.image_size, generator=g)
        x = x.to(device, memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (a.batch,), generator=g).to(device)
        torch.manual_seed(0)
        base = getattr(torchvision.models, a.model)(num_classes=1000).to(device, memory_format=torch.channels_last)
        quantize_model(base, QuantConfig(exclude=["fc$"]))
        calibrate(base, [x], base)
        base.train()
        lanes = {
            "ddp": Lane("ddp", copy.deepcopy(base), ddp=True, layout=True, device=device),
            "ddp_unfixed": Lane("ddp_unfixed", copy.deepcopy(base), ddp=True, layout=False, device=device),
            "plain": Lane("plain", copy.deepcopy(base), ddp=False, layout=False, device=device),
        }
        for lane in lanes.values():  # DDP warns once per process: the fixed lane goes first
            lane.step(x, y, probe=True)
            lane.block(x, y, a.warmup)
        blocks: dict[str, list[list[float] | None]] = {n: [] for n in lanes}
        for r in range(a.rounds):
            for n in round_order(list(lanes), r):
                blocks[n].append(lanes[n].block(x, y, a.block_steps))
        pairs = [("ddp", "plain"), ("ddp_unfixed", "plain"), ("ddp_unfixed", "ddp")]
        result = {
            "command": " ".join(["benchmarks/ddp_strides.py", *(argv if argv is not None else sys.argv[1:])]),
            "environment": environment(),
            "gpu": gpu_state() if device == "cuda" else None,
            "settings": vars(a),
            "lanes": {
                n: {"blocks_ms": blocks[n], "mismatched_grads": lane.mismatches, "warnings": lane.warnings}
                for n, lane in lanes.items()
            },
            "ratios": paired_ratios(blocks, pairs),
        }
    finally:
        dist.destroy_process_group()
    for n, lane in result["lanes"].items():
        bad = len(lane["mismatched_grads"])
        print(f"{n:9s} {bad} gradients laid out unlike their parameter; warnings: {lane['warnings']}")
    for k, s in result["ratios"].items():
        print(f"{k:16s} x{s['median']:.3f} (min {s['min']:.3f}, max {s['max']:.3f}, n={s['n']})")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
