"""Inference benchmark of the digits model and torchvision ResNet-50 over the PyTorch backends and ONNX Runtime.

Backends: PyTorch eager FP32, FP16 (CUDA only), QAT fake-quant INT8 (qatsparse quantizers, calibrated on the
example batch) and ONNX Runtime (FP32 ONNX; CUDA provider where installed, else the CPU). Weights are random:
latency does not depend on them. Writes JSON to ``--out`` and prints a table per model.

    python benchmarks/inference.py --out bench.json                 # batch 1, 32, 256 (the docs' numbers)
    python benchmarks/inference.py --out bench.json --quick         # small sizes, seconds on a CPU
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
from pathlib import Path

import torch
from torch import nn

from qatsparse.benchmark import benchmark, format_table
from qatsparse.quantization import QuantConfig, calibrate, quantize_model

BACKENDS = ("pytorch_fp32", "pytorch_fp16", "pytorch_qat", "onnxruntime")


def models(quick: bool) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """{name: (model, example batch)}: the digits ResidualCNN (8x8) and ResNet-50 (224x224; 64x64 with --quick)."""
    import torchvision

    from qatsparse.examples import ResidualCNN

    torch.manual_seed(0)
    side = 64 if quick else 224
    return {
        "digits_residual_cnn": (ResidualCNN().eval(), torch.randn(8, 1, 8, 8)),
        "resnet50": (torchvision.models.resnet50(weights=None).eval(), torch.randn(2, 3, side, side)),
    }


def fake_quantized(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy with qatsparse's INT8 fake quantizers, calibrated (max) on ``example``."""
    q = copy.deepcopy(model)
    quantize_model(q, QuantConfig(precision="int8"))
    calibrate(q, [example], q)
    return q


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where to write the JSON result")
    p.add_argument("--quick", action="store_true", help="small batches and images, short timing (for CI)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 32 256 (--quick: 1 2)")
    p.add_argument("--models", nargs="+", default=None, help="subset of: digits_residual_cnn resnet50")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timing per row (default 2; quick 0.05)")
    args = p.parse_args(argv)
    batch_sizes = args.batch_sizes or ([1, 2] if args.quick else [1, 32, 256])
    timing = (
        {"warmup_s": 0.0, "min_time_s": 0.05, "min_iters": 3, "max_time_s": 1.0}
        if args.quick
        else {"warmup_s": 0.5, "min_time_s": 2.0, "min_iters": 20, "max_time_s": 30.0}
    )
    if args.min_time is not None:
        timing["min_time_s"] = args.min_time
    available = models(args.quick)
    chosen = args.models or list(available)
    unknown = [m for m in chosen if m not in available]
    if unknown:
        p.error(f"unknown models {unknown}; valid: {list(available)}")
    out = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "models": {},
    }
    for name in chosen:
        model, example = available[name]
        result = benchmark(
            model,
            [example],
            batch_sizes=batch_sizes,
            backends=BACKENDS,
            device=args.device,
            qat_module=fake_quantized(model, example),
            **timing,
        )
        out["models"][name] = result
        print(f"\n== {name} (input {tuple(example.shape[1:])})")
        print(format_table(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
