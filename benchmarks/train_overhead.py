"""Training-step cost of 2:4 masks and INT8 QAT against plain AMP, through the real callbacks.

For each model and configuration a Lightning ``Trainer`` runs ``--warmup`` + ``--steps`` steps on a
fixed synthetic batch that is already on the GPU (no data loading in the timing); a callback
synchronises CUDA at the start and end of every training batch and records the step time and the
peak memory. Configurations: fp32, amp (16-mixed), amp_24 (+ TwoFourSparsity), amp_qat
(+ QuantizationAwareTraining int8), amp_24_qat (both). ``--compile`` compiles the model for every
configuration with the same settings (``qatsparse.compiling.compile_module``; for QAT the callback
compiles after calibration), so compiled is compared with compiled and eager with eager.

Usage (GPU):  python benchmarks/train_overhead.py --models resnet18 resnet50 vit_b_16 --out o.json
              python benchmarks/train_overhead.py --compile --models resnet50 --out c.json
CPU smoke:    python benchmarks/train_overhead.py --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, IterableDataset

from qatsparse import QuantizationAwareTraining, TwoFourSparsity
from qatsparse.compiling import compile_module

CONFIGS = ("fp32", "amp", "amp_24", "amp_qat", "amp_24_qat")
DEFAULT_BATCH = {"resnet18": 128, "resnet50": 128, "vit_b_16": 64}


class FixedBatches(IterableDataset):
    """Yields the same pre-made batch (already on the target device) ``n`` times: no collate, no copy."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        self.x, self.y, self.n = x, y, n

    def __iter__(self):
        for _ in range(self.n):
            yield self.x, self.y


class Classifier(pl.LightningModule):
    """A torchvision classifier trained with SGD + momentum; channels_last for convnets."""

    def __init__(self, arch: str, image_size: int, channels_last: bool) -> None:
        super().__init__()
        kwargs = {"image_size": image_size} if arch.startswith("vit") else {}
        self.net = getattr(torchvision.models, arch)(num_classes=1000, **kwargs)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


class StepTimer(pl.Callback):
    """CUDA-synchronised wall time of every training batch (forward, backward, step, hooks); with
    ``profile`` the timed steps also run under ``torch.profiler`` and its table is printed at the end."""

    def __init__(self, warmup: int, profile: bool = False) -> None:
        self.warmup, self.times, self._t0 = warmup, [], 0.0
        self.peak_bytes = 0
        self.profiler: torch.profiler.profile | None = None
        self.profile = profile

    def on_train_end(self, trainer, pl_module) -> None:
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            print(self.profiler.key_averages().table(sort_by=sort, row_limit=25), flush=True)

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if batch_idx == self.warmup and self.profile:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=acts)
            self.profiler.__enter__()
        self._sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        if batch_idx >= self.warmup:
            self.times.append((time.perf_counter() - self._t0) * 1e3)
        if torch.cuda.is_available():
            self.peak_bytes = torch.cuda.max_memory_allocated()


def run_one(
    arch: str,
    config: str,
    batch: int,
    image_size: int,
    warmup: int,
    steps: int,
    compile_: bool | str,
    device: str,
    profile: bool = False,
) -> dict[str, Any]:
    torch.manual_seed(0)
    convnet = not arch.startswith("vit")
    model = Classifier(arch, image_size, channels_last=convnet)
    fmt = torch.channels_last if convnet else torch.contiguous_format
    x = torch.randn(batch, 3, image_size, image_size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)
    callbacks: list[pl.Callback] = [StepTimer(warmup, profile)]
    if "24" in config:
        callbacks.append(TwoFourSparsity(start_step=0, exclude=["fc$", "heads"], verbose=False))
    if "qat" in config:
        callbacks.append(
            QuantizationAwareTraining(
                precision="int8",
                calib_batches=2,
                start_step=0,
                exclude=["fc$", "heads"],
                compile=compile_,
                verbose=False,
            )
        )
    if convnet:  # sparsify first, then change memory format (masks are layout-independent anyway)
        model = model.to(memory_format=torch.channels_last)
    if compile_ and "qat" not in config:
        compile_module(model, compile_)  # the same compile settings as the QAT callback's
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision="32-true" if config == "fp32" else ("16-mixed" if device == "cuda" else "bf16-mixed"),
        max_steps=warmup + steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(FixedBatches(x, y, warmup + steps + 4), batch_size=None)
    trainer.fit(model, train_dataloaders=loader)
    timer = callbacks[0]
    assert isinstance(timer, StepTimer)
    t = sorted(timer.times)
    return {
        "model": arch,
        "config": config,
        "compiled": compile_,
        "batch": batch,
        "image_size": image_size,
        "steps_timed": len(t),
        "median_ms": statistics.median(t),
        "p90_ms": t[int(0.9 * (len(t) - 1))],
        "min_ms": t[0],
        "peak_mem_gib": timer.peak_bytes / 2**30,
    }


def environment() -> dict[str, Any]:
    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "torchvision": torchvision.__version__,
    }
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "vit_b_16"])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--compile", action="store_true", help="compile every configuration")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (implies --compile)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=None, help="override the per-model default batch")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: resnet18, 32x32, batch 4, 3 steps")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table per configuration")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compile_: bool | str = a.compile_mode or a.compile
    if a.quick:
        a.models, a.image_size, a.batch, a.warmup, a.steps = ["resnet18"], 32, 4, 1, 3
    rows = []
    for arch in a.models:
        for config in a.configs:
            if device == "cpu" and config == "amp" and not a.quick:
                continue
            try:
                r = run_one(
                    arch,
                    config,
                    a.batch or DEFAULT_BATCH.get(arch, 64),
                    a.image_size,
                    a.warmup,
                    a.steps,
                    compile_,
                    device,
                    a.profile,
                )
            except Exception as e:  # record and go on: one failing configuration must not lose the others
                rows.append({"model": arch, "config": config, "compiled": compile_, "error": repr(e)[:500]})
                print(f"{arch:10s} {config:11s} FAILED: {e!r}"[:300], flush=True)
                continue
            base = next((b for b in rows if b["model"] == arch and b["config"] == "amp" and "error" not in b), None)
            r["vs_amp"] = r["median_ms"] / base["median_ms"] if base else None
            rows.append(r)
            print(
                f"{arch:10s} {config:11s} compiled={compile_!s:5s} median {r['median_ms']:8.2f} ms  "
                f"p90 {r['p90_ms']:8.2f}  peak {r['peak_mem_gib']:6.2f} GiB  "
                f"x{r['vs_amp'] or float('nan'):.3f} vs amp",
                flush=True,
            )
    result = {"environment": environment(), "device": device, "args": vars(a), "results": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
