"""2:4 + INT8 QAT under ``strategy="ddp"``: identical masks and amax on every rank, and QAT step scaling.

Runs the real callbacks on torchvision ResNet-18 (synthetic data, per-GPU batch ``--batch``) twice:
on 1 GPU and on ``--devices`` GPUs. Each rank hashes its 2:4 masks and its quantizers' amax; rank 0
checks the hashes are identical and reports the median QAT step time on 1 and N GPUs and the weak-scaling
efficiency ``t(1 GPU) / t(N GPUs)`` (1.0 = perfect: same per-GPU work, no communication cost).

    python benchmarks/ddp_check.py --devices 2 --out ddp.json        # GPU machine with 2 GPUs
    python benchmarks/ddp_check.py --cpu --devices 2 --quick         # CPU smoke run (gloo)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_overhead import Classifier, FixedBatches, StepTimer, environment

from qatsparse import QuantizationAwareTraining, TwoFourSparsity
from qatsparse.quantization import quantizers


def rank_digest(pl_module: pl.LightningModule, sparsity: TwoFourSparsity) -> dict[str, str]:
    """Hashes of this rank's masks and amax values (equal hashes = bit-identical state)."""
    masks = hashlib.sha256()
    assert sparsity.masks is not None
    for name in sorted(sparsity.masks.masks):
        masks.update(name.encode())
        masks.update(sparsity.masks.masks[name].detach().bool().cpu().numpy().tobytes())
    amax = hashlib.sha256()
    for name, q in sorted(quantizers(pl_module).items()):
        amax.update(name.encode())
        amax.update(q.amax.detach().float().cpu().numpy().tobytes())
    return {"masks": masks.hexdigest(), "amax": amax.hexdigest()}


def run(devices: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = Classifier("resnet18", args.image_size, channels_last=True).to(memory_format=torch.channels_last)
    sparsity = TwoFourSparsity(start_step=0, exclude=["fc$"], verbose=False)
    qat = QuantizationAwareTraining(calib_batches=2, start_step=1, exclude=["fc$"], verbose=False)
    timer = StepTimer(args.warmup)
    accel = "cpu" if args.cpu else "gpu"
    trainer = pl.Trainer(
        accelerator=accel,
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision="32-true" if args.cpu else "16-mixed",
        max_steps=args.warmup + args.steps,
        callbacks=[timer, sparsity, qat],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        benchmark=not args.cpu,
    )
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = "cpu" if args.cpu else f"cuda:{rank}"
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data, as with a DistributedSampler
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    trainer.fit(model, train_dataloaders=DataLoader(FixedBatches(x, y, args.warmup + args.steps + 4), batch_size=None))
    digest = rank_digest(model, sparsity)
    digests = [digest]
    if dist.is_available() and dist.is_initialized():
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
    return {
        "devices": devices,
        "median_ms": statistics.median(timer.times),
        "digests": digests,
        "identical": all(d == digests[0] for d in digests),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cpu", action="store_true", help="gloo on the CPU (smoke run)")
    p.add_argument("--quick", action="store_true", help="batch 4, 32x32, 1+3 steps")
    p.add_argument("--single", action="store_true", help="internal: the 1-device reference run")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.quick:
        a.batch, a.image_size, a.warmup, a.steps = 4, 32, 1, 3
    if a.single:  # a separate process, so the DDP run below starts clean
        print(json.dumps(run(1, a)))
        return
    multi = run(a.devices, a)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0 or (dist.is_initialized() and dist.get_rank() != 0):
        return
    import subprocess

    argv = [
        sys.executable,
        __file__,
        "--single",
        "--batch",
        str(a.batch),
        "--image-size",
        str(a.image_size),
        "--warmup",
        str(a.warmup),
        "--steps",
        str(a.steps),
    ] + (["--cpu"] if a.cpu else [])
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK")
    }
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout
    single = json.loads(out.strip().splitlines()[-1])
    result = {
        "environment": environment(),
        "args": vars(a),
        "single": single,
        "ddp": multi,
        "weak_scaling_efficiency": single["median_ms"] / multi["median_ms"],
    }
    print(
        f"masks/amax identical on {a.devices} ranks: {multi['identical']}; QAT step {single['median_ms']:.2f} ms "
        f"(1 device) vs {multi['median_ms']:.2f} ms ({a.devices} devices): weak-scaling efficiency "
        f"{result['weak_scaling_efficiency']:.3f}"
    )
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
    if not multi["identical"]:
        raise SystemExit("ranks disagree on masks or amax")


if __name__ == "__main__":
    main()
