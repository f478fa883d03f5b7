"""Training-step cost of 2:4 masks and INT8 QAT against AMP: paired, interleaved, in one process.

Every configuration of a model runs through the real callbacks in its own Lightning ``Trainer`` on a
fixed synthetic batch that is already on the device (no data loading in the timing). The configurations
of one model run side by side in one process (``benchmarks/lanes.py``): each is built, compiled,
calibrated and warmed up alone, then measured alone for its peak memory, and then all of them run
``--rounds`` rounds of one ``--block-steps`` block each, in an order reversed every round. Every ratio
is the median over rounds of (candidate block median / baseline block median), reported with its
min, max and quartiles next to the absolute medians. The JSON is rewritten after every lane and round,
so a run cut short by a time limit still leaves its data.

Configurations (lanes): ``amp`` (``precision="16-mixed"``; FP32 on the CPU, a smoke run), ``amp_24``
(+ ``TwoFourSparsity``), ``amp_24_qat`` (+ ``QuantizationAwareTraining(int8)``); the ``c_`` twins are
compiled (``qatsparse.compiling.compile_module``, the same settings as ``compile=True``; QAT compiles
after calibration), so compiled is compared with compiled; ``mo_*`` are ModelOpt's eager 2:4
(``mts.sparsify``, magnitude) and INT8 QAT (``mtq.quantize``, ``INT8_DEFAULT_CFG``), when
``nvidia-modelopt`` is importable (else skipped with the reason). The compiled QAT lanes are
``c_amp_24_qat_rc`` (``recompute=True``, the callback's default) and ``c_amp_24_qat`` (``recompute=False``,
named so since its first runs, when that was the default). The classifier (``fc``/``heads``) is excluded everywhere.
``--groups`` picks lane groups, ``--lanes`` single lanes; lanes are set up in that order, and one that
would not finish (with its rounds) before ``--deadline-s`` is skipped with the reason in the JSON.

Usage (GPU, one model at a time, most important first; stops starting work at --deadline-s):
    python benchmarks/train_overhead.py --models resnet50 resnet18 vit_b_16 --out o.json
CPU smoke (tiny sizes, NCHW, FP32, eager lanes and ModelOpt's if installed; not a measurement):
    python benchmarks/train_overhead.py --quick --out /tmp/q.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lanes import Lane, paired_ratios, round_order

from qatsparse import QuantizationAwareTraining, TwoFourSparsity
from qatsparse.compiling import compile_module

PROTOCOL = "paired-rounds/1"
DEFAULT_BATCH = {"resnet18": 128, "resnet50": 128, "vit_b_16": 64}
EXCLUDE = ["fc$", "heads"]  # the classifier stays in higher precision and dense, in every lane
# qatsparse rejects a pattern that matches no layer (each model has only one of the two): one alternation
QS_EXCLUDE = ["|".join(EXCLUDE)]


@dataclass(frozen=True)
class Config:
    """One lane: what is added to plain AMP training."""

    sparsity: bool = False
    qat: bool = False
    compiled: bool = False
    modelopt: bool = False
    qat_kwargs: dict[str, Any] = field(default_factory=dict)


CONFIGS: dict[str, Config] = {
    "amp": Config(),
    "amp_24": Config(sparsity=True),
    "amp_24_qat": Config(sparsity=True, qat=True),
    "c_amp": Config(compiled=True),
    "c_amp_24": Config(sparsity=True, compiled=True),
    # recompute=False: kept explicit, the lane has meant that since its first run (the default is True now)
    "c_amp_24_qat": Config(sparsity=True, qat=True, compiled=True, qat_kwargs={"recompute": False}),
    "mo_24": Config(sparsity=True, modelopt=True),
    "mo_qat": Config(qat=True, modelopt=True),
    "mo_24_qat": Config(sparsity=True, qat=True, modelopt=True),
    "c_amp_24_qat_rc": Config(sparsity=True, qat=True, compiled=True, qat_kwargs={"recompute": True}),
}
GROUPS = {
    "compiled": ["c_amp", "c_amp_24_qat_rc", "c_amp_24_qat", "c_amp_24"],
    "eager": ["amp", "amp_24_qat", "amp_24"],
    "modelopt": ["mo_24_qat", "mo_qat", "mo_24"],
    "recompute": ["c_amp_24_qat_rc"],
}
#: The default lanes, in set-up order: a deadline skips the last ones first.
DEFAULT_ORDER = [
    "c_amp",
    "c_amp_24_qat_rc",
    "c_amp_24_qat",
    "amp",
    "amp_24_qat",
    "mo_24_qat",
    "c_amp_24",
    "amp_24",
    "mo_qat",
    "mo_24",
]
#: (candidate, baseline) pairs whose paired ratio is reported when both lanes ran.
PAIRS = [
    ("c_amp_24", "c_amp"),
    ("c_amp_24_qat", "c_amp"),
    ("amp_24", "amp"),
    ("amp_24_qat", "amp"),
    ("c_amp", "amp"),
    ("mo_24", "amp"),
    ("mo_qat", "amp"),
    ("mo_24_qat", "amp"),
    ("amp_24_qat", "mo_24_qat"),
    ("c_amp_24_qat", "mo_24_qat"),
    ("c_amp_24_qat_rc", "c_amp"),
    ("c_amp_24_qat_rc", "c_amp_24_qat"),
]
#: Set-up time assumed for a lane before one of its kind has been timed in this run (seconds).
SETUP_GUESS_S = {"compiled": 150.0, "modelopt": 60.0, "eager": 20.0}


class Endless(IterableDataset):
    """Yields the same pre-made batch (already on the target device) forever: no collate, no copy."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        while True:
            yield self.x, self.y


class FixedBatches(Endless):
    """The same batch ``n`` times (``benchmarks/ddp_check.py``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        super().__init__(x, y)
        self.n = n

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
    """CUDA-synchronised wall time of every training batch after ``warmup`` (``benchmarks/ddp_check.py``)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._t0 = warmup, [], 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        if batch_idx >= self.warmup:
            self.times.append((time.perf_counter() - self._t0) * 1e3)


# ---------------------------------------------------------------------- ModelOpt (the anchor)
def modelopt_status() -> tuple[str | None, str | None]:
    """(version, None) when ``nvidia-modelopt`` imports, else (None, the reason)."""
    try:
        import modelopt
        import modelopt.torch.quantization
        import modelopt.torch.sparsity
    except Exception as e:  # any import failure is a reason to skip, recorded as such
        return None, f"nvidia-modelopt is not importable here ({type(e).__name__}: {e})"[:300]
    return modelopt.__version__, None


def modelopt_prebuild() -> None:
    """Build ModelOpt's CUDA fake-quant extension (~1 min on first use) while other lanes compile."""
    try:
        from modelopt.torch.quantization.extensions import get_cuda_ext

        get_cuda_ext()
    except Exception:  # the lane that needs it reports the error
        pass


def modelopt_prepare(net: torch.nn.Module, x: torch.Tensor, cfg: Config, calib_batches: int) -> torch.nn.Module:
    """ModelOpt's own 2:4 (magnitude) and INT8 QAT preparation of ``net`` (on ``x``'s device, NCHW:
    ``mts.sparsify`` refuses channels_last, so the caller converts afterwards)."""
    import modelopt.torch.quantization as mtq
    import modelopt.torch.sparsity as mts

    was = net.training
    net.eval()
    with torch.no_grad():
        if cfg.sparsity:
            rules = {
                "nn.Linear": {"*": {}, **{f"*{p.rstrip('$')}*": None for p in EXCLUDE}},
                "nn.Conv2d": {"*": {}, **{f"*{p.rstrip('$')}*": None for p in EXCLUDE}},
            }
            net = mts.sparsify(
                net, [("sparse_magnitude", rules)], config={"data_loader": [x], "collect_func": lambda b: b}
            )
        if cfg.qat:
            qcfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
            qcfg["quant_cfg"] += [{"quantizer_name": f"*{p.rstrip('$')}*", "enable": False} for p in EXCLUDE]

            def loop(m: torch.nn.Module) -> None:
                for _ in range(calib_batches):
                    m(x)

            net = mtq.quantize(net, qcfg, loop)
    net.train(was)
    return net


def modelopt_layers(net: torch.nn.Module) -> dict[str, list[str]]:
    """Which layers ModelOpt made sparse (a mask is set) and which quantizers it left enabled."""
    sparse = [n for n, m in net.named_modules() if getattr(m, "_weight_mask", None) is not None]
    quant = [n for n, m in net.named_modules() if n.endswith("quantizer") and getattr(m, "is_enabled", False)]
    return {"sparse": sparse, "enabled_quantizers": quant}


# ---------------------------------------------------------------------- one lane
def fit_lane(
    lane: Lane, cfg: Config, arch: str, x: torch.Tensor, y: torch.Tensor, image_size: int, channels_last: bool
) -> None:
    """Build lane ``lane.name``'s model and callbacks and train until the lane is stopped (lane thread)."""
    torch.manual_seed(0)
    device = x.device
    model = Classifier(arch, image_size, channels_last=channels_last)
    callbacks: list[pl.Callback] = [lane.clock]
    if cfg.modelopt:
        model.to(device)
        model.net = modelopt_prepare(model.net, x.contiguous(), cfg, calib_batches=2)
        lane.info["modelopt_layers"] = modelopt_layers(model.net)
    else:
        if cfg.sparsity:
            callbacks.append(TwoFourSparsity(start_step=0, exclude=QS_EXCLUDE, verbose=False))
        if cfg.qat:
            callbacks.append(
                QuantizationAwareTraining(
                    precision="int8",
                    calib_batches=2,
                    start_step=0,
                    exclude=QS_EXCLUDE,
                    compile=cfg.compiled,
                    verbose=False,
                    **cfg.qat_kwargs,
                )
            )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compiled and not cfg.qat:
        # On the device first, as the QAT callback does, so compile_module sees CUDA parameters and
        # turns on the same C++ launcher for this lane as for the QAT lane.
        model.to(device)
        compile_module(model, True)
    cuda = device.type == "cuda"
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="16-mixed" if cuda else "32-true",  # bf16 autocast is emulated, slow, on most CPUs
        max_steps=-1,
        max_epochs=-1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        benchmark=cuda,
    )
    trainer.fit(model, train_dataloaders=DataLoader(Endless(x, y), batch_size=None))


def _summary(times: list[float]) -> dict[str, Any]:
    if not times:
        return {"median_ms": None, "min_ms": None, "max_ms": None, "steps": 0}
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "steps": len(times)}


def lane_record(lane: Lane, cfg: Config) -> dict[str, Any]:
    steps = [t for b in lane.blocks if b for t in b]
    return {
        "config": {k: v for k, v in cfg.__dict__.items()},
        "setup_s": lane.setup_s,
        "error": lane.error,
        "peak_mem_gib": lane.peak_bytes / 2**30 if lane.peak_bytes is not None else None,
        "solo_ms": lane.solo_ms,
        "blocks_ms": lane.blocks,
        "block_medians_ms": [statistics.median(b) for b in lane.blocks if b],
        **_summary(steps),
        **{k: v for k, v in lane.info.items()},
    }


# ---------------------------------------------------------------------- environment
def gpu_state() -> dict[str, Any] | None:
    """nvidia-smi's view of the GPU now: name, driver, clocks, temperature, power, throttle reasons."""
    fields = (
        "name,driver_version,pstate,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,"
        "temperature.gpu,power.draw,power.limit,clocks_throttle_reasons.active,memory.total"
    )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    which = ["-i", visible] if visible.isdigit() else []  # the GPU this process uses, not the host's first
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", *which],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()
    except Exception:  # no nvidia-smi (CPU machine) or it failed: no GPU state to record
        return None
    first = out.splitlines()[0] if out else ""
    return dict(zip(fields.split(","), (v.strip() for v in first.split(","))))


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "torchvision": torchvision.__version__,
        "cpu_count": os.cpu_count(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    try:
        import torch._inductor.config as inductor_config

        env["inductor_cpp_wrapper"] = bool(inductor_config.cpp_wrapper)
    except Exception:  # inductor unavailable: nothing compiled anyway
        pass
    return env


def _set_recompile_limit(n: int) -> None:
    # Several compiled models of one class are alive at once: keep each compiled, not silently eager.
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(n, getattr(dynamo_config, name)))


# ---------------------------------------------------------------------- one model
def run_model(
    arch: str, lane_names: list[str], args: argparse.Namespace, rec: dict[str, Any], save, t_start: float
) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    channels_last = not arch.startswith("vit") and not args.quick  # NCHW is 2x faster on CPUs
    batch = args.batch or DEFAULT_BATCH.get(arch, 64)
    rec.update(batch=batch, image_size=args.image_size, channels_last=channels_last, status="running")
    rec.update(lanes={}, rounds=[], ratios={})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, args.image_size, args.image_size, generator=g)
    x = x.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    left = lambda: args.deadline_s - (time.monotonic() - t_start)  # noqa: E731
    lanes: dict[str, Lane] = {}
    setup_s: dict[str, float] = {}  # the longest set-up of each kind so far
    try:
        for i, name in enumerate(lane_names):
            cfg = CONFIGS[name]
            kind = _kind(cfg)
            # the lane's set-up, then all rounds with every lane so far and this one
            need = setup_s.get(kind, SETUP_GUESS_S[kind]) + args.rounds * (i + 1) * args.block_steps * args.step_guess_s
            if left() < max(need, args.min_lane_s) + args.reserve_s:
                rec["lanes"][name] = {"error": f"not started: {left():.0f} s left, about {need:.0f} s needed"}
                print(f"[{time.monotonic() - t_start:6.0f}s] {arch} {name}: {rec['lanes'][name]['error']}", flush=True)
                save()
                continue
            lane = Lane(
                name,
                partial(
                    fit_lane, cfg=cfg, arch=arch, x=x, y=y, image_size=args.image_size, channels_last=channels_last
                ),
                warmup=args.warmup,
                memory_steps=args.memory_steps,
                device=device.type,
                timeout_s=max(60.0, left()),
            )
            print(f"[{time.monotonic() - t_start:6.0f}s] {arch} {name}: setting up", flush=True)
            lane.start()
            setup_s[kind] = max(setup_s.get(kind, 0.0), lane.setup_s or 0.0)
            lanes[name] = lane
            rec["lanes"][name] = lane_record(lane, cfg)
            r = rec["lanes"][name]
            print(
                f"[{time.monotonic() - t_start:6.0f}s] {arch} {name}: setup {lane.setup_s:.0f} s, "
                + (f"FAILED {lane.error}" if lane.error else f"alone {_fmt(r['solo_ms'])} ms, peak {_gib(r)}"),
                flush=True,
            )
            save()
        live = [n for n in lane_names if n in lanes and lanes[n].ok]
        blocks: dict[str, list[list[float] | None]] = {n: [] for n in live}
        pairs = [(c, b) for c, b in PAIRS if c in live and b in live]
        round_s = 0.0
        for r in range(args.rounds):
            if left() < round_s * 1.2 + args.reserve_s:
                rec["stopped"] = f"after {r} rounds: {left():.0f} s left before --deadline-s"
                break
            t0 = time.monotonic()
            order = round_order(live, r)
            for n in order:
                blocks[n].append(lanes[n].run_block(args.block_steps))
            round_s = time.monotonic() - t0
            rec["rounds"].append({"order": order, "seconds": round_s, "gpu": gpu_state()})
            for n in live:
                rec["lanes"][n] = lane_record(lanes[n], CONFIGS[n])
            rec["ratios"] = paired_ratios(blocks, pairs)
            for ratio in rec["ratios"].values():
                pc = rec["lanes"][ratio["candidate"]]["peak_mem_gib"]
                pb = rec["lanes"][ratio["baseline"]]["peak_mem_gib"]
                ratio["memory_ratio"] = pc / pb if pc and pb else None
            save()
        for name in args.profile:
            if name in live and lanes[name].ok and left() > args.reserve_s:
                lanes[name].info["profile_top_ms_per_step"] = lanes[name].run_profile(args.block_steps)
                rec["lanes"][name] = lane_record(lanes[name], CONFIGS[name])
        rec["status"] = "done" if len(rec["rounds"]) == args.rounds else "partial"
        save()
    finally:
        for lane in lanes.values():
            lane.stop(timeout_s=30.0)
        lanes.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    _print_table(arch, rec)


def _kind(cfg: Config) -> str:
    return "modelopt" if cfg.modelopt else ("compiled" if cfg.compiled else "eager")


def _fmt(times: list[float]) -> str:
    return f"{statistics.median(times):.2f}" if times else "-"


def _gib(r: dict[str, Any]) -> str:
    return f"{r['peak_mem_gib']:.2f} GiB" if r.get("peak_mem_gib") is not None else "n/a (CPU)"


def _print_table(arch: str, rec: dict[str, Any]) -> None:
    print(f"\n{arch} b{rec['batch']}: {len(rec['rounds'])} rounds")
    for name, r in rec["lanes"].items():
        med = f"{r['median_ms']:.2f} ms" if r.get("median_ms") is not None else "-"
        print(f"  {name:14s} {med:>11s}  peak {_gib(r):>10s}  {r.get('error') or ''}"[:200])
    for key, s in rec["ratios"].items():
        if s["n"]:
            mem = f"  memory x{s['memory_ratio']:.3f}" if s.get("memory_ratio") else ""
            print(
                f"  {key:26s} x{s['median']:.3f}  (min {s['min']:.3f}, max {s['max']:.3f}, "
                f"IQR {s['q1']:.3f}-{s['q3']:.3f}, n={s['n']}){mem}"
            )
    print(flush=True)


# ---------------------------------------------------------------------- main
def _lanes_for(args: argparse.Namespace) -> list[str]:
    names = list(args.lanes or [])
    groups = [n for g in args.groups for n in GROUPS[g]]
    order = DEFAULT_ORDER if set(groups) == set(DEFAULT_ORDER) else groups
    return names + [n for n in dict.fromkeys(order) if n not in names]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "resnet18", "vit_b_16"])
    p.add_argument("--groups", nargs="*", default=None, choices=sorted(GROUPS), help="lane groups (default: all)")
    p.add_argument("--lanes", nargs="*", default=None, choices=sorted(CONFIGS), help="single lanes, before groups")
    p.add_argument("--rounds", type=int, default=7, help="rounds of interleaved blocks (>= 5 for a reported ratio)")
    p.add_argument("--block-steps", type=int, default=10, help="timed steps per lane per round")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per lane (compilation, calibration)")
    p.add_argument("--memory-steps", type=int, default=3, help="steps measured alone for peak memory")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=None, help="override the per-model default batch")
    p.add_argument("--deadline-s", type=float, default=1e9, help="start no lane or round that would end past this")
    p.add_argument("--min-lane-s", type=float, default=10.0, help="time a lane needs at least to be started")
    p.add_argument("--step-guess-s", type=float, default=0.05, help="step time assumed when planning rounds")
    p.add_argument("--reserve-s", type=float, default=5.0, help="time kept free at the end")
    p.add_argument("--profile", nargs="*", default=[], help="lanes to profile for one block after the rounds")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: resnet18, 32x32, batch 2, short phases")
    p.add_argument("--out", default=None, help="write the JSON result here (rewritten after every lane and round)")
    a = p.parse_args(argv)
    if a.quick:
        torch.set_num_threads(1)  # a smoke run on a shared CPU: no thread contention
        a.models, a.image_size, a.batch = ["resnet18"], 32, 2
        a.warmup, a.memory_steps, a.block_steps, a.rounds = 1, 1, 2, 5
        a.step_guess_s = 1.0
        if a.groups is None and not a.lanes:
            a.groups = ["eager", "modelopt"]
    if a.groups is None:
        a.groups = [] if a.lanes else list(GROUPS)
    names = _lanes_for(a)
    cuda = torch.cuda.is_available() and not a.cpu
    mo_version, mo_reason = modelopt_status() if any(CONFIGS[n].modelopt for n in names) else (None, None)
    skipped = {}
    if mo_reason:
        skipped = {n: mo_reason for n in names if CONFIGS[n].modelopt}
        names = [n for n in names if n not in skipped]
    elif mo_version and cuda:
        threading.Thread(target=modelopt_prebuild, name="modelopt-ext", daemon=True).start()
    _set_recompile_limit(64)
    t_start = time.monotonic()
    result: dict[str, Any] = {
        "protocol": PROTOCOL,
        "command": " ".join(["benchmarks/train_overhead.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": "cuda" if cuda else "cpu",
        "environment": environment(),
        "modelopt": mo_version,
        "skipped_lanes": skipped,
        "gpu_start": gpu_state() if cuda else None,
        "settings": {
            k: getattr(a, k) for k in ("rounds", "block_steps", "warmup", "memory_steps", "image_size", "deadline_s")
        },
        "lanes": names,
        "pairs": [list(pc) for pc in PAIRS],
        "models": {},
    }

    def save() -> None:
        result["environment"] = {**result["environment"], **environment(), "date": result["environment"]["date"]}
        result["elapsed_s"] = time.monotonic() - t_start
        if a.out:
            tmp = Path(f"{a.out}.tmp")
            tmp.write_text(json.dumps(result, indent=1))
            os.replace(tmp, a.out)

    for reason_lane, reason in skipped.items():
        print(f"skipped {reason_lane}: {reason}", flush=True)
    for arch in a.models:
        rec: dict[str, Any] = {}
        result["models"][arch] = rec
        if a.deadline_s - (time.monotonic() - t_start) < a.min_lane_s:
            rec["status"] = "not started: --deadline-s reached"
            save()
            continue
        run_model(arch, names, a, rec, save, t_start)
        save()
    result["gpu_end"] = gpu_state() if cuda else None
    save()
    return result


if __name__ == "__main__":
    main()
