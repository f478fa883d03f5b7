"""2:4 + INT8 QAT under Lightning's FSDP strategy: identical masks and amax on every rank, a bit-identical resume,
and QAT step scaling.

Runs the real callbacks on torchvision ResNet-18 (synthetic data, per-device batch ``--batch``) under
``FSDPStrategy`` (each ResNet ``BasicBlock`` its own FSDP unit, ``--wrap none``: the whole module one unit; full
state dicts; docs/distributed.md):

1. timed: ``--warmup + --steps`` steps on ``--devices`` devices; each rank hashes its 2:4 masks, its quantizers'
   amax and the full (gathered) weights; rank 0 checks the hashes are identical on every rank;
2. resume round trip (deterministic algorithms): 4 steps with a checkpoint after step 2, then a second fit
   resumed from that checkpoint to step 4; the full weights, masks and amax must hash the same as the first's;
3. the same timed run on 1 device without FSDP (a separate process), for the weak-scaling efficiency
   ``t(1 device) / t(N devices)`` at the same per-device batch (1.0 = perfect).

    python benchmarks/fsdp_check.py --devices 2 --out fsdp.json                   # 2 GPUs (NCCL)
    python benchmarks/fsdp_check.py --devices 2 --accelerator cpu --quick         # 2 CPU processes (gloo)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the resume round trip

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import FSDPStrategy
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_overhead import Classifier, FixedBatches, StepTimer, environment

from qatsparse import QuantizationAwareTraining, TwoFourSparsity
from qatsparse.quantization import quantizers
from qatsparse.sharding import CPUFSDPStrategy, full_weights


class Digest(pl.Callback):
    """At fit end, on every rank: SHA-256 of the masks, the amax values and the full (gathered) weights."""

    def __init__(self) -> None:
        self.digest: dict[str, str] = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sparsity = next(cb for cb in trainer.callbacks if isinstance(cb, TwoFourSparsity))
        assert sparsity.masks is not None
        masks, amax, weights = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
        for name in sorted(sparsity.masks.masks):
            masks.update(name.encode())
            masks.update(sparsity.masks.masks[name].detach().bool().cpu().numpy().tobytes())
        for name, q in sorted(quantizers(pl_module).items()):
            amax.update(name.encode())
            amax.update(q.amax.detach().float().cpu().numpy().tobytes())
        with full_weights(trainer):  # every rank gathers the same full weights (cloned: FSDP frees their storage)
            for name, p in sorted(pl_module.named_parameters()):
                weights.update(name.encode())
                weights.update(p.detach().float().cpu().clone().numpy().tobytes())
        self.digest = {"masks": masks.hexdigest(), "amax": amax.hexdigest(), "weights": weights.hexdigest()}


def gather(obj: dict) -> list[dict]:
    if dist.is_available() and dist.is_initialized():
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def fit(devices: int, args: argparse.Namespace, steps: int, *, timed: bool, workdir: Path | None = None,
        ckpt: Path | None = None) -> dict:  # fmt: skip
    torch.manual_seed(0)
    cpu = args.accelerator == "cpu"
    model = Classifier("resnet18", args.image_size, channels_last=not cpu)
    if not cpu:
        model = model.to(memory_format=torch.channels_last)
    digest, timer = Digest(), StepTimer(args.warmup if timed else 0)
    callbacks: list = [
        timer,
        TwoFourSparsity(start_step=0, exclude=["fc$"], verbose=False),
        QuantizationAwareTraining(calib_batches=2, start_step=1, exclude=["fc$"], verbose=False),
        digest,
    ]
    if getattr(args, "plain", False):  # the same run without qatsparse: what FSDP itself costs
        callbacks = [timer]
    saving = workdir is not None and ckpt is None  # the first half of the round trip: a checkpoint after step 2
    if saving:
        callbacks.append(pl.callbacks.ModelCheckpoint(workdir, filename="{step}", every_n_train_steps=2, save_top_k=-1))
    if devices > 1:
        from torchvision.models.resnet import BasicBlock

        kwargs = {"auto_wrap_policy": {BasicBlock}} if args.wrap == "block" else {}
        strategy: object = CPUFSDPStrategy(**kwargs) if cpu else FSDPStrategy(**kwargs)
    else:
        strategy = "auto"
    trainer = pl.Trainer(
        accelerator="cpu" if cpu else "gpu",
        devices=devices,
        strategy=strategy,
        precision="32-true" if cpu else "16-mixed",
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=saving,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        benchmark=timed and not cpu,
        deterministic="warn" if not timed else False,  # "warn": an op without a deterministic kernel is named
    )
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = "cpu" if cpu else f"cuda:{rank}"
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data, as with a DistributedSampler
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    if not cpu:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    loader = DataLoader(FixedBatches(x, y, steps + 4), batch_size=None)
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt)
    digests = gather(digest.digest) if digest in callbacks else []
    out = {"devices": devices, "steps": steps, "digests": digests, "identical": all(d == digests[0] for d in digests)}
    if timed:
        out["median_ms"] = statistics.median(timer.times)
        out["times_ms"] = timer.times
    return out


def round_trip(devices: int, args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir)
    straight = fit(devices, args, 4, timed=False, workdir=workdir)
    resumed = fit(devices, args, 4, timed=False, workdir=workdir, ckpt=workdir / "step=2.ckpt")
    same = [a == b for a, b in zip(straight["digests"], resumed["digests"])]
    # control: the same 4 steps again without a checkpoint; if these differ too, the device is not deterministic
    again = fit(devices, args, 4, timed=False)
    repeatable = [a == b for a, b in zip(straight["digests"], again["digests"])]
    return {"straight": straight, "resumed": resumed, "again": again, "repeatable": all(repeatable),
            "bit_identical": all(same) and straight["identical"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--accelerator", choices=("gpu", "cpu"), default="gpu", help="cpu: gloo (smoke run)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--wrap", choices=("block", "none"), default="block", help="FSDP units: each BasicBlock, or one")
    p.add_argument("--quick", action="store_true", help="batch 4, 32x32, 1+3 steps")
    p.add_argument("--single", action="store_true", help="internal: the 1-device reference run")
    p.add_argument("--workdir", default="fsdp_check_ckpt", help="checkpoints of the resume round trip (removed)")
    p.add_argument("--out", default=None)
    p.add_argument("--plain", action="store_true", help="no qatsparse callbacks (timing baseline)")
    a = p.parse_args()
    if a.quick:
        a.batch, a.image_size, a.warmup, a.steps = 4, 32, 1, 3
    if a.single:  # a separate process, so the FSDP run below starts clean
        print(json.dumps(fit(1, a, a.warmup + a.steps, timed=True)))
        return
    if a.accelerator == "cpu":
        torch.set_num_threads(1)
    multi = fit(a.devices, a, a.warmup + a.steps, timed=True)
    trip = round_trip(a.devices, a) if not a.plain else {"bit_identical": True, "skipped": "plain timing run"}
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    shutil.rmtree(a.workdir, ignore_errors=True)
    argv = [sys.executable, __file__, "--single", "--accelerator", a.accelerator, "--batch", str(a.batch),
            "--image-size", str(a.image_size), "--warmup", str(a.warmup), "--steps", str(a.steps),
            *(["--plain"] if a.plain else [])]  # fmt: skip
    drop = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("PL_", "TORCHELASTIC"))}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"the 1-device reference run failed:\n{proc.stderr[-3000:]}")
    out = proc.stdout
    single = json.loads(out.strip().splitlines()[-1])
    result = {
        "environment": environment(),
        "args": vars(a),
        "single": single,
        "fsdp": multi,
        "resume": trip,
        "weak_scaling_efficiency": single["median_ms"] / multi["median_ms"],
    }
    print(
        f"FSDP on {a.devices} ranks: masks/amax/weights identical: {multi['identical']}; resume bit-identical: "
        f"{trip['bit_identical']}; QAT step {single['median_ms']:.2f} ms (1 device) vs {multi['median_ms']:.2f} ms "
        f"({a.devices} devices, FSDP): weak-scaling efficiency {result['weak_scaling_efficiency']:.3f}"
    )
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
    if not (multi["identical"] and trip["bit_identical"]):
        raise SystemExit("ranks disagree on masks or amax, or the resumed run differs")


if __name__ == "__main__":
    main()
