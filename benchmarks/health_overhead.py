"""Host time of the numerical-health check per training step, with both compression callbacks watching.

Inside the 200-step window after a compression step, ``TwoFourSparsity`` and ``QuantizationAwareTraining``
each check the gradient norms before the optimizer step (``qatsparse.health``). Until this was changed,
each check walked the module tree with names (Python) and computed the norms (one fused kernel and one
device-to-host copy, a GPU sync), so a step paid both twice. Now the owners are listed once per model and
the second callback reuses the first one's norms. This script measures, on the CPU, per step of a
quantized torchvision model with gradients of the real sizes:

- ``walk_ms``: listing the owners of every parameter (pure Python; the part that does not depend on the device);
- ``before_ms``: what a step cost before (two walks, two norm computations);
- ``now_ms``: what it costs now (one computation, the second check served from it).

On the CPU the norm computation itself is part of both; on a GPU it is one small kernel, and the Python
walk ran while the GPU waited at the sync. Rounds are interleaved (before, now, now, before, ...).

    python benchmarks/health_overhead.py --out benchmarks/results/health_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_overhead import environment

from qatsparse.health import _module_grad_norms, _parameter_owners, forget_parameters
from qatsparse.quantization import QuantConfig, quantize_model

MODELS = {"resnet50": {}, "vit_b_16": {"image_size": 224}}


def _timed(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def measure(arch: str, rounds: int, reps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10, **MODELS[arch])
    quantize_model(model, QuantConfig())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    step = [0]

    def before() -> None:  # each callback: walk the modules, compute the norms
        for _ in range(2):
            forget_parameters(model)
            _module_grad_norms(model)

    def now() -> None:  # each callback: the listed owners, the norms of this step computed once
        step[0] += 1
        for _ in range(2):
            _module_grad_norms(model, step[0])

    before(), now()  # warm-up
    walk = [_timed(lambda: _parameter_owners(model, refresh=True), reps) for _ in range(rounds)]
    b, n = [], []
    for r in range(rounds):
        order = (before, now) if r % 2 == 0 else (now, before)
        for fn in order:
            (b if fn is before else n).append(_timed(fn, reps))
    return {
        "parameters": sum(1 for _ in model.parameters()),
        "modules": sum(1 for _ in model.modules()),
        "walk_ms": statistics.median(walk),
        "before_ms": statistics.median(b),
        "now_ms": statistics.median(n),
        "before_ms_all": b,
        "now_ms_all": n,
        "saved_ms_min_max": [min(x - y for x, y in zip(b, n)), max(x - y for x, y in zip(b, n))],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(MODELS))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=5, help="steps per timed block")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "command": " ".join(["benchmarks/health_overhead.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": environment(),
        "device": "cpu, 1 thread",
        "rounds": a.rounds,
        "reps": a.reps,
        "models": {},
    }
    for arch in a.models:
        r = result["models"][arch] = measure(arch, a.rounds, a.reps)
        print(f"{arch:10s} walk {r['walk_ms']:.2f} ms  step before {r['before_ms']:.2f} ms  now {r['now_ms']:.2f} ms")
        if a.out:
            Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
