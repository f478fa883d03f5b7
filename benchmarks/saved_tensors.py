"""What a compiled training step keeps for its backward: AMP against INT8 QAT formulations.

Compiles a small torchvision ResNet (BasicBlock, one block per stage, channels_last, autocast) for each
variant and records, with ``torch.autograd.graph.saved_tensors_hooks``, every tensor the compiled
forward saves for the backward (storage-deduplicated), grouped by dtype. Activation-sized tensors
(batch first) are what grows with the batch; the rest is weight-sized. Variants:

- ``amp``: no quantization;
- ``qat``: ``QuantConfig()`` (the default fusable fake quantization);
- ``qat_clamp_eq``: the in-range mask written as ``clamp(q) == q`` (ops the partitioner may recompute)
  instead of ``(q >= qmin) & (q <= qmax)`` (``bitwise_and`` is not on its recompute list); not adopted;
- ``qat_int8_code``: the value made from an int8 code (which the partitioner might keep); not adopted;
- ``qat_recompute``: compiled with ``compile_module(recompute=True)`` (the partitioner may recompute
  fake-quantized conv inputs in the backward);
- ``qat_no_residual``: ``QuantConfig(residual=False)`` (no quantizer on the residual inputs of adds).

Each variant also lists which activation tensors (dtype and shape without the batch) it keeps beyond
AMP's (``extra_vs_amp``), when ``amp`` ran first.

    python benchmarks/saved_tensors.py --out saved.json          # CPU (bf16 autocast) or CUDA (fp16)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_overhead import environment

import qatsparse.quantization.fakequant as fakequant
from qatsparse.compiling import compile_module
from qatsparse.quantization import QuantConfig, calibrate, quantize_model

VARIANTS = ("amp", "qat", "qat_clamp_eq", "qat_int8_code", "qat_recompute", "qat_no_residual")


def _rounded(
    x: torch.Tensor, amax: torch.Tensor, axis: int | None, narrow_range: bool
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """The scale (shaped for ``axis``), qmin and ``round(x / scale)``, as ``fake_quantize_int8_fusable``."""
    scale = fakequant._scale(amax)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    qmin = float(-fakequant.INT8_MAX if narrow_range else -fakequant.INT8_MAX - 1)
    return scale, qmin, torch.round(x.float() * (1.0 / scale))


def fusable_clamp_eq(x: torch.Tensor, amax: torch.Tensor, axis: int | None, narrow_range: bool) -> torch.Tensor:
    """``fake_quantize_int8_fusable`` with the in-range mask as ``clamp(q) == q`` (same numbers)."""
    scale, qmin, q = _rounded(x, amax, axis, narrow_range)
    qc = torch.clamp(q, qmin, fakequant.INT8_MAX)
    inside = qc == q
    y = (qc * scale).to(x.dtype)
    ste = x * inside.to(x.dtype)
    return ste + (y - ste).detach()


def fusable_int8_code(x: torch.Tensor, amax: torch.Tensor, axis: int | None, narrow_range: bool) -> torch.Tensor:
    """``fake_quantize_int8_fusable`` with the value made from an int8 code (same numbers)."""
    scale, qmin, q = _rounded(x, amax, axis, narrow_range)
    inside = (q >= qmin) & (q <= fakequant.INT8_MAX)
    code = torch.clamp(q, qmin, fakequant.INT8_MAX).to(torch.int8)
    y = (code.float() * scale).to(x.dtype)
    ste = x * inside.to(x.dtype)
    return ste + (y - ste).detach()


FORMULATIONS = {"qat_clamp_eq": fusable_clamp_eq, "qat_int8_code": fusable_int8_code}


@contextlib.contextmanager
def formulation(variant: str):
    if variant not in FORMULATIONS:
        yield
        return
    saved = fakequant.fake_quantize_int8_fusable
    fakequant.fake_quantize_int8_fusable = FORMULATIONS[variant]
    try:
        yield
    finally:
        fakequant.fake_quantize_int8_fusable = saved


def saved_for_backward(
    model: torch.nn.Module, x: torch.Tensor, device: str, phases: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """The tensors the forward saves for the backward; on CUDA, fills ``phases`` with the memory (MiB) above
    what was allocated before the forward: live after the forward (saved tensors and the output), peak in
    the forward, peak in the backward (saved tensors plus the backward's own buffers and the gradients)."""
    seen: dict[int, dict[str, Any]] = {}
    cuda = device == "cuda" and phases is not None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = {
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "bytes": t.untyped_storage().nbytes(),
        }
        return t

    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device, dtype=dtype):
        out = model(x)
    if cuda:
        torch.cuda.synchronize()
        phases["after_forward_mib"] = (torch.cuda.memory_allocated() - base) / 2**20
        phases["peak_forward_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    out.float().sum().backward()
    if cuda:
        torch.cuda.synchronize()
        phases["peak_backward_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return list(seen.values())


ARCHS = {
    "small": "ResNet(BasicBlock, [1, 1, 1, 1])",
    "resnet18": "torchvision resnet18",
    "resnet50": "torchvision resnet50",
}


def build(arch: str) -> torch.nn.Module:
    if arch == "small":
        return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    return getattr(torchvision.models, arch)(num_classes=10)


def measure(variant: str, x: torch.Tensor, device: str, arch: str = "small") -> dict[str, Any]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build(arch)
    model = model.to(device, memory_format=torch.channels_last)
    if variant != "amp":
        config = QuantConfig(exclude=["fc$"], residual=variant != "qat_no_residual")
        quantize_model(model, config)
        calibrate(model, [x], model)
        model.train()
    compile_module(model, True, recompute=variant == "qat_recompute")
    with formulation(variant):
        t0 = time.perf_counter()
        saved_for_backward(model, x, device)  # compiles
        compile_s = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        tensors = saved_for_backward(model, x, device)
        model.zero_grad(set_to_none=True)
        phases: dict[str, float] = {}
        saved_for_backward(model, x, device, phases)
    acts = [t for t in tensors if t["shape"][:1] == [x.shape[0]]]
    return {
        "compile_s": compile_s,
        "activation_bytes": sum(t["bytes"] for t in acts),
        "activation_tensors_by_dtype": dict(sorted(Counter(t["dtype"] for t in acts).items())),
        "activation_bytes_by_dtype": {
            d: sum(t["bytes"] for t in acts if t["dtype"] == d) for d in sorted({t["dtype"] for t in acts})
        },
        "other_bytes": sum(t["bytes"] for t in tensors if t not in acts),
        "memory_phases": phases,  # CUDA only: MiB above what was allocated before the forward
        "tensors": tensors,
    }


def kinds(tensors: list[dict[str, Any]], batch: int) -> Counter:
    """Activation tensors (batch first) by dtype and shape without the batch."""
    return Counter(f"{t['dtype']} {'x'.join(map(str, t['shape'][1:]))}" for t in tensors if t["shape"][:1] == [batch])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--arch", default="small", choices=sorted(ARCHS), help="the model (default: a one-block ResNet)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--cpu", action="store_true")
    p.add_argument(
        "--functorch",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="torch._functorch.config settings, e.g. "
        "activation_memory_budget=0.7 ban_recompute_reductions=False (for every variant)",
    )
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not a.cpu else "cpu"
    import torch._functorch.config as functorch_config

    for item in a.functorch:
        key, value = item.split("=", 1)
        setattr(functorch_config, key, json.loads(value.lower()))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, generator=g).to(device, memory_format=torch.channels_last)
    result: dict[str, Any] = {
        "command": " ".join(["benchmarks/saved_tensors.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": environment(),
        "device": device,
        "model": f"{ARCHS[a.arch]}, channels_last",
        "batch": a.batch,
        "image_size": a.image_size,
        "variants": {},
    }
    for v in a.variants:
        result["variants"][v] = measure(v, x, device, a.arch)
        r = result["variants"][v]
        if v != "amp" and "amp" in result["variants"]:
            base = kinds(result["variants"]["amp"]["tensors"], a.batch)
            r["extra_vs_amp"] = dict(sorted((kinds(r["tensors"], a.batch) - base).items()))
        mib = r["activation_bytes"] / 2**20
        print(f"{v:14s} activations {mib:8.3f} MiB {r['activation_tensors_by_dtype']} {r['memory_phases']}", flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
