"""How BatchNorm is treated while calibrating decides whether an early QAT start survives its first steps.

QAT is started at step ``--qat-step`` of a randomly initialised torchvision model (BatchNorm running
statistics far from the batch statistics, as when QAT starts before they settle), on random 64 px images,
SGD(lr 0.05, momentum 0.9), with INT8 ranges calibrated either with BatchNorm on its **running** statistics
(what a deployed model computes; qatsparse before this study) or on each calibration batch's **batch**
statistics (what the QAT training steps compute; qatsparse's default). Per step it records the loss and the
gradient norm, and the health events qatsparse reported (step and layers). One process, CPU::

    PYTHONPATH=. python benchmarks/bn_calibration.py --out benchmarks/results/bn_calibration.json
    PYTHONPATH=. python benchmarks/bn_calibration.py --table benchmarks/results/bn_calibration.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import qatsparse.callbacks.quantization as qat_module
from qatsparse import QuantizationAwareTraining
from qatsparse.quantization import calibrate


class _Net(pl.LightningModule):
    def __init__(self, arch: str) -> None:
        super().__init__()
        import torchvision

        self.net = torchvision.models.get_model(arch, num_classes=10)
        self.rows: list[dict[str, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.rows.append({"step": self.trainer.global_step, "loss": float(loss)})
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        norms = [p.grad.norm() for p in self.parameters() if p.grad is not None]
        self.rows[-1]["grad_norm"] = float(torch.stack(norms).norm())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def run(arch: str, mode: str, qat_step: int, steps: int) -> dict[str, Any]:
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 64, 64, generator=g), torch.randint(0, 10, (64,), generator=g)
    model = _Net(arch)
    qat = QuantizationAwareTraining(start_step=qat_step, calib_batches=2, verbose=False)
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[qat],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    original = qat_module.calibrate
    qat_module.calibrate = functools.partial(calibrate, batchnorm=mode)  # the only difference between the runs
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True))
    finally:
        qat_module.calibrate = original
    return {
        "arch": arch,
        "calibration_batchnorm": mode,
        "qat_step": qat_step,
        "steps": model.rows,
        "health": [e.to_dict() for e in qat.health.monitor.events],
        "seconds": time.perf_counter() - t0,
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "| model | BatchNorm while calibrating | grad norm, last step before QAT | grad norm, first 3 QAT steps "
        "| QAT steps with non-finite gradients | reported by qatsparse |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["runs"]:
        before = [s["grad_norm"] for s in r["steps"] if s["step"] < r["qat_step"]]
        after = [s["grad_norm"] for s in r["steps"] if s["step"] >= r["qat_step"]]
        fmt = ", ".join("non-finite" if not math.isfinite(v) else f"{v:.3g}" for v in after[:3])
        bad = sum(not math.isfinite(v) for v in after)
        health = "; ".join(f"step {e['step']}: {e['what']} ({', '.join(e['layers'][:2])})" for e in r["health"]) or "-"
        mode = r["calibration_batchnorm"]
        lines.append(f"| {r['arch']} | {mode} | {before[-1]:.3g} | {fmt} | {bad} of {len(after)} | {health} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["mnasnet0_5", "resnet50"])
    ap.add_argument("--qat-step", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--table", type=Path, help="print the markdown table of a results JSON")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    torch.set_num_threads(2)
    runs = [run(a, m, args.qat_step, args.steps) for a in args.archs for m in ("running", "batch")]
    results = {
        "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "runs": runs,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, allow_nan=True))
    print(table(results))


if __name__ == "__main__":
    main()
