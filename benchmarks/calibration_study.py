"""INT8 calibration study on the digits task: accuracy vs calibrator and number of calibration samples.

Trains the example ResidualCNN once (dense FP32), then measures validation accuracy of
* FP32 and FP16 (weights and activations rounded to half, as ``precision="fp16"`` trains it);
* INT8 post-training quantization for each calibrator (max, entropy, percentile 99.99, mse) and
  calibration-sample counts from 64 to the whole training set, each on ``--repeats`` random subsets;
* INT8 after a short QAT (``--qat-epochs`` epochs at 1 % of the training learning rate, one-cycle
  cosine schedule) for each calibrator, calibrated on 512 samples.

Runs on a CPU in a few minutes::

    PYTHONPATH=. python benchmarks/calibration_study.py --out docs/calibration_study.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import platform
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from qatsparse import QuantizationAwareTraining
from qatsparse.examples import DigitsDataModule, ResidualCNN
from qatsparse.quantization import QuantConfig, calibrate, quantize_model, set_quantizers_enabled

CALIBRATORS = ("max", "entropy", "percentile", "mse")


def _trainer(epochs: int, callbacks: list | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
        callbacks=callbacks or [],
    )


@torch.no_grad()
def evaluate(model: nn.Module, val: tuple[torch.Tensor, torch.Tensor], reference: torch.Tensor) -> tuple[float, float]:
    """(accuracy %, SQNR of the logits against the FP32 ``reference`` logits in dB)."""
    model.eval()
    x, y = val
    logits = model(x)
    noise = float((logits - reference).pow(2).sum())
    sqnr = math.inf if noise == 0 else 10 * math.log10(float(reference.pow(2).sum()) / noise)
    return 100.0 * float((logits.argmax(1) == y).float().mean()), sqnr


def ptq(dense: nn.Module, calibrator: str, samples: Subset) -> nn.Module:
    m = copy.deepcopy(dense).eval()
    quantize_model(m, QuantConfig(calibrator=calibrator))
    calibrate(m, DataLoader(samples, batch_size=64), lambda b: m(b[0]))
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10, help="dense training epochs")
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="random calibration subsets per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = ap.parse_args()
    t0 = time.time()

    pl.seed_everything(args.seed, verbose=False)
    dm = DigitsDataModule(batch_size=64, seed=args.seed)
    dm.setup("fit")
    assert dm.val_set is not None and dm.train_set is not None
    val = dm.val_set.tensors
    dense = ResidualCNN(lr=0.1)
    _trainer(args.epochs).fit(dense, dm)
    dense.eval()
    with torch.no_grad():
        ref = dense(val[0])
    fp32_acc, _ = evaluate(dense, val, ref)
    fp16 = copy.deepcopy(dense)
    quantize_model(fp16, QuantConfig(precision="fp16"))
    fp16_acc, fp16_sqnr = evaluate(fp16, val, ref)

    n_train = len(dm.train_set)
    counts = [c for c in (64, 128, 256, 512, 1024) if c < n_train] + [n_train]
    ptq_rows: dict[str, dict[int, list[tuple[float, float]]]] = {c: {} for c in CALIBRATORS}
    for cal in CALIBRATORS:
        for n in counts:
            for r in range(args.repeats if n <= 256 else 1):
                idx = torch.randperm(n_train, generator=torch.Generator().manual_seed(1000 * r + n))[:n]
                m = ptq(dense, cal, Subset(dm.train_set, idx.tolist()))
                ptq_rows[cal].setdefault(n, []).append(evaluate(m, val, ref))

    qat_rows: dict[str, tuple[float, float, float, float]] = {}
    for cal in CALIBRATORS:
        pl.seed_everything(args.seed, verbose=False)
        m = copy.deepcopy(dense).train()
        m.hparams.lr = dense.hparams.lr * 0.01
        before = ptq(dense, cal, Subset(dm.train_set, list(range(512))))
        cb = QuantizationAwareTraining(calibrator=cal, calib_batches=8, start_step=0, verbose=False)
        _trainer(args.qat_epochs, [cb]).fit(m, dm)
        int8_acc = evaluate(m, val, ref)[0]
        set_quantizers_enabled(m, False)
        qat_rows[cal] = (*evaluate(before, val, ref), int8_acc, evaluate(m, val, ref)[0])

    elapsed = time.time() - t0
    text = report(args, fp32_acc, fp16_acc, fp16_sqnr, counts, ptq_rows, qat_rows, len(val[0]), elapsed)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


def _cell(values: list[tuple[float, float]], k: int, fmt: str) -> str:
    v = [row[k] for row in values]
    mean = sum(v) / len(v)
    if len(v) == 1 or min(v) == max(v):
        return format(mean, fmt)
    return f"{format(mean, fmt)} ({format(min(v), fmt)} to {format(max(v), fmt)})"


def report(args, fp32, fp16, fp16_sqnr, counts, ptq_rows, qat_rows, n_val, elapsed) -> str:
    head = "| calibrator | " + " | ".join(str(n) for n in counts) + " |"
    rule = "|---|" + "---|" * len(counts)
    lines = [
        "# INT8 calibration study (digits)",
        "",
        "Command: `PYTHONPATH=. python benchmarks/calibration_study.py "
        f"--epochs {args.epochs} --qat-epochs {args.qat_epochs} --repeats {args.repeats} --seed {args.seed} "
        "--out docs/calibration_study.md`",
        "",
        f"Date: {datetime.date.today().isoformat()}; machine: {platform.machine()} CPU, "
        f"{torch.get_num_threads()} torch threads; torch {torch.__version__}; run time {elapsed:.0f} s.",
        "",
        f"Model: the example `ResidualCNN` (widths 32, 64; 4 residual blocks) trained {args.epochs} epochs "
        f"on scikit-learn's digits; validation set of {n_val} images (one image = {100 / n_val:.2f} points).",
        "INT8: per-channel max weights; per-tensor activations with the named calibrator; residual "
        "quantizers on the identity branch of each add (TensorRT placement). SQNR: signal-to-quantization-"
        "noise ratio of the validation logits against the FP32 logits, in dB (higher is closer to FP32).",
        "",
        "## FP32 and FP16",
        "",
        "| precision | val accuracy (%) | logit SQNR vs FP32 (dB) |",
        "|---|---|---|",
        f"| FP32 | {fp32:.2f} | - |",
        f"| FP16 (weights and activations rounded to half) | {fp16:.2f} | {fp16_sqnr:.1f} |",
        "",
        "## INT8 post-training quantization vs number of calibration samples",
        "",
        f"Mean (min to max) over {args.repeats} random calibration subsets for up to 256 samples, one subset "
        "above (the full training set has only one).",
        "",
        "Validation accuracy (%):",
        "",
        head,
        rule,
    ]
    names = {"percentile": "percentile 99.99"}
    for cal, row in ptq_rows.items():
        lines.append(f"| {names.get(cal, cal)} | " + " | ".join(_cell(row[n], 0, ".2f") for n in counts) + " |")
    lines += ["", "Logit SQNR vs FP32 (dB):", "", head, rule]
    for cal, row in ptq_rows.items():
        lines.append(f"| {names.get(cal, cal)} | " + " | ".join(_cell(row[n], 1, ".1f") for n in counts) + " |")
    lines += [
        "",
        f"## After QAT ({args.qat_epochs} epochs from the dense model, peak LR 1 % of training, one-cycle "
        "cosine schedule, calibrated on 512 samples)",
        "",
        "| calibrator | PTQ INT8 accuracy (%) | PTQ SQNR (dB) | QAT INT8 accuracy (%) "
        "| QAT weights run in FP32 (quantizers off) (%) |",
        "|---|---|---|---|---|",
    ]
    for cal, (acc0, sqnr0, acc, acc_fp32) in qat_rows.items():
        lines.append(f"| {names.get(cal, cal)} | {acc0:.2f} | {sqnr0:.1f} | {acc:.2f} | {acc_fp32:.2f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
