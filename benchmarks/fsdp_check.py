"""2:4 + INT8 QAT under Lightning's FSDP strategy: identical masks and amax on every rank, a bit-identical resume,
and QAT step scaling.

Runs the real callbacks on torchvision ResNet-18 (synthetic data, per-device batch ``--batch``) under
``FSDPStrategy`` (each ResNet ``BasicBlock`` its own FSDP unit, ``--wrap none``: the whole module one unit; full
state dicts; docs/distributed.md):

1. timed: ``--warmup + --steps`` steps on ``--devices`` devices; each rank hashes its 2:4 masks, its quantizers'
   amax and the full (gathered) weights; rank 0 checks the hashes are identical on every rank;
2. resume round trip (deterministic algorithms): 4 steps with a checkpoint after step 2, then a second fit
   resumed from that checkpoint to step 4; the full weights, masks and amax must hash the same as the first's
   (``--resume-only``: just this, with per-tensor hashes of parameters and optimizer state at step 2, to find
   what a resume restored differently);
3. export: 4 steps with ``TensorRTExport`` at fit end under FSDP, and rank 0 exporting the ``model.ckpt`` it
   wrote again in one process: ``model.onnx``, ``model_fp32.onnx`` and the hand-off inputs/outputs equal byte for
   byte;
4. the same timed run on 1 device without FSDP (a separate process), for the weak-scaling efficiency
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

from qatsparse import QuantizationAwareTraining, TensorRTExport, TwoFourSparsity
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
        per_param: dict[str, str] = {}
        with full_weights(trainer):  # every rank gathers the same full weights (cloned: FSDP frees their storage)
            for name, p in sorted(pl_module.named_parameters()):
                data = p.detach().float().cpu().clone().numpy().tobytes()
                weights.update(name.encode())
                weights.update(data)
                per_param[name] = hashlib.sha256(data).hexdigest()[:12]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.digest = {"masks": masks.hexdigest(), "amax": amax.hexdigest(), "weights": weights.hexdigest(),
                       "scaler": {k: float(v) for k, v in scaler.state_dict().items()} if scaler is not None else None,
                       "amax_dtypes": sorted({str(q.amax.dtype) for q in quantizers(pl_module).values()}),
                       "params": per_param}  # fmt: skip


class Probe(pl.Callback):
    """Diagnosis: at the start of step 2 (where the resumed fit begins), this rank's local parameter shards and
    optimizer state, hashed per tensor: the straight and the resumed fit must agree here."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if trainer.global_step != 2 or self.seen:
            return
        h = lambda t: hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:12]  # noqa: E731
        for name, p in pl_module.named_parameters():
            self.seen[f"param:{name}"] = h(p) + f"|{tuple(p.shape)}|{p.stride()}"
        opt = trainer.optimizers[0]
        for i, group in enumerate(opt.param_groups):
            for j, p in enumerate(group["params"]):
                for k, v in opt.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):
                        self.seen[f"opt:{i}.{j}.{k}"] = h(v) + f"|{tuple(v.shape)}|{v.stride()}"


class Validated(Classifier):
    """The benchmark's classifier with a validation loss: what the export validates against."""

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]), sync_dist=True)


#: What the fit-end export under FSDP and a single-process export of its model.ckpt must write byte for byte.
EXPORT_FILES = ("model.onnx", "model_fp32.onnx", "tensorrt/inputs.npz", "tensorrt/outputs_onnxruntime.npz")


def exporter(dirpath: Path) -> TensorRTExport:
    return TensorRTExport(dirpath, build_engine=False, max_metric_drop=1.0, lint=False, batch_sizes=(1, 8, 8))


def export_equality(devices: int, args: argparse.Namespace) -> dict:
    """4 steps of 2:4 + QAT under FSDP with TensorRTExport at fit end (rank 0 exports the gathered model), then
    rank 0 exports the ``model.ckpt`` that export wrote again in this one process: the files must be equal."""
    torch.manual_seed(0)
    cpu = args.accelerator == "cpu"
    model = Validated("resnet18", args.image_size, channels_last=not cpu)
    if not cpu:
        model = model.to(memory_format=torch.channels_last)
    out = Path(args.workdir) / "export"
    trainer = pl.Trainer(
        accelerator="cpu" if cpu else "gpu", devices=devices,
        strategy=CPUFSDPStrategy() if cpu else FSDPStrategy(),
        precision=args.precision or ("32-true" if cpu else "16-mixed"),
        max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[TwoFourSparsity(start_step=0, exclude=["fc$"], verbose=False),
                   QuantizationAwareTraining(calib_batches=2, start_step=1, exclude=["fc$"], verbose=False),
                   exporter(out / "fsdp")],
    )  # fmt: skip
    g = torch.Generator().manual_seed(1000 + int(os.environ.get("LOCAL_RANK", "0")))
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    gv = torch.Generator().manual_seed(7)  # the same validation data on every rank and in the single export
    xv = torch.randn(16, 3, args.image_size, args.image_size, generator=gv)
    yv = torch.randint(0, 1000, (16,), generator=gv)
    val = DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=8)
    trainer.fit(model, train_dataloaders=DataLoader(FixedBatches(x, y, 8), batch_size=None), val_dataloaders=val)
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    single = exporter(out / "single")
    fresh = Validated("resnet18", args.image_size, channels_last=False)
    single.export_checkpoint(fresh, out / "fsdp" / "model.ckpt", val)
    equal = {f: (out / "fsdp" / f).read_bytes() == (out / "single" / f).read_bytes() for f in EXPORT_FILES}
    reports = [json.loads((out / d / "report.json").read_text()) for d in ("fsdp", "single")]
    agree = reports[0]["agreement"] == reports[1]["agreement"]
    return {"files_equal": equal, "agreement_equal": agree, "passed": [r["passed"] for r in reports],
            "agreement": [r["agreement"] for r in reports],
            "equal": all(equal.values()) and agree}  # fmt: skip


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
    cl = not cpu and not getattr(args, "no_channels_last", False)
    model = Classifier("resnet18", args.image_size, channels_last=cl)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    digest, timer = Digest(), StepTimer(args.warmup if timed else 0)
    callbacks: list = [
        timer,
        TwoFourSparsity(start_step=0, exclude=["fc$"], verbose=False),
        QuantizationAwareTraining(calib_batches=2, start_step=1, exclude=["fc$"], verbose=False),
        digest,
    ]
    probe = Probe()
    if getattr(args, "resume_only", False):
        callbacks.append(probe)
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
        precision=args.precision or ("32-true" if cpu else "16-mixed"),
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
        x = x.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    loader = DataLoader(FixedBatches(x, y, steps + 4), batch_size=None)
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt)
    digests = gather(digest.digest) if digest in callbacks else []
    out = {"devices": devices, "steps": steps, "digests": digests, "identical": all(d == digests[0] for d in digests)}
    if probe in callbacks:  # after the rank comparison: local shards differ between ranks by design
        for d, seen in zip(digests, gather(probe.seen)):
            d["probe"] = seen
    if timed:
        out["median_ms"] = statistics.median(timer.times)
        out["times_ms"] = timer.times
    return out


def round_trip(devices: int, args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir)
    straight = fit(devices, args, 4, timed=False, workdir=workdir)
    resumed = fit(devices, args, 4, timed=False, workdir=workdir, ckpt=workdir / "step=2.ckpt")
    same = [a == b for a, b in zip(straight["digests"], resumed["digests"])]
    for a, b in zip(straight["digests"], resumed["digests"]):  # which parameters differ (diagnosis; empty if none)
        b["params_differing"] = sorted(k for k in a["params"] if a["params"][k] != b["params"].get(k))
        if "probe" in a:
            b["probe_differing"] = sorted(k for k in a["probe"] if a["probe"][k] != b["probe"].get(k))
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
    p.add_argument("--no-channels-last", action="store_true", help="GPU runs: contiguous model and inputs")
    p.add_argument("--resume-only", action="store_true", help="only the resume round trip (diagnosis)")
    p.add_argument("--precision", default=None, help="Trainer precision (default: 16-mixed on GPUs, 32-true on CPUs)")
    a = p.parse_args()
    if a.quick:
        a.batch, a.image_size, a.warmup, a.steps = 4, 32, 1, 3
    if a.single:  # a separate process, so the FSDP run below starts clean
        print(json.dumps(fit(1, a, a.warmup + a.steps, timed=True)))
        return
    if a.accelerator == "cpu":
        torch.set_num_threads(1)
    if a.resume_only:  # only the round trip (diagnosis of one precision)
        trip = round_trip(a.devices, a)
        if not dist.is_initialized() or dist.get_rank() == 0:
            shutil.rmtree(a.workdir, ignore_errors=True)
            print(
                f"precision {a.precision}: resume bit-identical {trip['bit_identical']}, repeatable "
                f"{trip['repeatable']}, differing {trip['resumed']['digests'][0].get('params_differing', [])[:6]}; "
                f"at step 2: {trip['resumed']['digests'][0].get('probe_differing', [])[:8]}"
            )
            if a.out:
                Path(a.out).write_text(json.dumps({"environment": environment(), "args": vars(a), "resume": trip}))
        return
    multi = fit(a.devices, a, a.warmup + a.steps, timed=True)
    trip = round_trip(a.devices, a) if not a.plain else {"bit_identical": True, "skipped": "plain timing run"}
    export = export_equality(a.devices, a) if not a.plain else {"equal": True, "skipped": "plain timing run"}
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
        "export": export,
        "weak_scaling_efficiency": single["median_ms"] / multi["median_ms"],
    }
    print(
        f"FSDP on {a.devices} ranks: masks/amax/weights identical: {multi['identical']}; resume bit-identical: "
        f"{trip['bit_identical']}; export equal to a single-process export: {export['equal']}; "
        f"QAT step {single['median_ms']:.2f} ms (1 device) vs {multi['median_ms']:.2f} ms "
        f"({a.devices} devices, FSDP): weak-scaling efficiency {result['weak_scaling_efficiency']:.3f}"
    )
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
    if not (multi["identical"] and trip["bit_identical"] and export["equal"]):
        raise SystemExit("ranks disagree on masks or amax, the resumed run differs, or the exports differ")


if __name__ == "__main__":
    main()
