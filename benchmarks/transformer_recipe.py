"""The attention recipe, measured: dense vs INT8 + 2:4 (attention matmuls quantized or not), equal steps.

Runs ``recipes/digits_transformer_int8_sparse.yaml`` through the ``qatsparse fit`` command, one subprocess per
run (``nice``, ``--threads`` torch threads), for each seed:

* ``dense``: the same recipe without compression (only ``TensorRTExport``: the FP32 model of the last step,
  exported and run by ONNX Runtime) -- the run the recipe header's dense command gives;
* ``int8_2to4``: the recipe as shipped (``attention_matmuls`` at its default);
* ``int8_2to4_attention_matmuls``: the recipe with ``attention_matmuls: true`` (Q*K^T and softmax*V quantized).

Per run it records every backend's top-1 from ``report.json`` (``onnxruntime`` is the deployable
``model.onnx``), the ONNX Runtime graph-optimization level validation used, the 2:4 share and the wall time.
``--table`` prints the Markdown table of a results JSON (docs/quantization.md and the recipe header)::

    PYTHONPATH=. python benchmarks/transformer_recipe.py --seeds 0 1 2 --out benchmarks/results/digits_transformer.json
    PYTHONPATH=. python benchmarks/transformer_recipe.py --table benchmarks/results/digits_transformer.json
    PYTHONPATH=. python benchmarks/transformer_recipe.py --seeds 0 1 2 --patch 2 \\
        --out benchmarks/results/digits_transformer_patch2.json   # 16 patch tokens: more attention
    (``--resume`` keeps the runs already in ``--out`` and runs only the missing ones.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits_transformer_int8_sparse.yaml"
VARIANTS = ("dense", "int8_2to4", "int8_2to4_attention_matmuls")


def config(variant: str, seed: int, out: Path, max_steps: int | None, model: dict[str, Any]) -> dict[str, Any]:
    """The recipe for ``variant``, writing under ``out``, with ``model`` init_args changed."""
    cfg = yaml.safe_load(RECIPE.read_text())
    cfg["seed_everything"] = seed
    cfg["model"]["init_args"].update(model)
    cfg["trainer"]["default_root_dir"] = str(out)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(out)
    if max_steps:  # a quick check of the script: the stages scaled down with the schedule
        scale = max_steps / cfg["trainer"]["max_steps"]
        for c in cfg["trainer"]["callbacks"]:
            if "start_step" in c.get("init_args", {}):
                c["init_args"]["start_step"] = int(c["init_args"]["start_step"] * scale)
        cfg["trainer"]["max_steps"] = max_steps
    callbacks = cfg["trainer"]["callbacks"]
    for c in callbacks:
        if c["class_path"].endswith("TensorRTExport"):
            c["init_args"].update(dirpath=str(out), on_fail="warn")
        if c["class_path"].endswith("QuantizationAwareTraining") and variant == "int8_2to4_attention_matmuls":
            c["init_args"]["attention_matmuls"] = True
    if variant == "dense":
        cfg["trainer"]["callbacks"] = [c for c in callbacks if c["class_path"].endswith("TensorRTExport")]
    return cfg


def run(variant: str, seed: int, threads: int, max_steps: int | None, model: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(config(variant, seed, out, max_steps, model), sort_keys=False))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        cmd = ["nice", "-n", "10", sys.executable, "-m", "qatsparse", "fit", "--config", str(path)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0 or not (out / "report.json").exists():
            return {"variant": variant, "seed": seed, "error": proc.stderr[-3000:], "seconds": seconds}
        report = json.loads((out / "report.json").read_text())
        graph = onnx.load(str(out / "model.onnx")).graph
        quantize_nodes = sum(n.op_type == "QuantizeLinear" for n in graph.node)
    backends = report["backends"]
    return {
        "variant": variant,
        "seed": seed,
        "top1": {name: b["metrics"].get("top1") for name, b in backends.items()},
        "onnx_precision": backends["onnxruntime"].get("precision"),
        "attention_matmuls": (report.get("quantization") or {}).get("attention_matmuls"),
        "quantize_nodes_in_model_onnx": quantize_nodes,
        "onnxruntime_graph_optimization": (report.get("onnxruntime") or {}).get("level"),
        "weights_2to4_share": (report.get("sparsity") or {}).get("weights_2to4_share"),
        "passed": report["passed"],
        "samples": report.get("samples"),
        "seconds": seconds,
    }


def table(results: dict[str, Any]) -> str:
    """Markdown: per variant, the ONNX Runtime top-1 of ``model.onnx`` for each seed, the mean, and its
    difference from the dense run of the same seed."""
    runs = [r for r in results["runs"] if "error" not in r]
    by = {(r["variant"], r["seed"]): r for r in runs}
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    seeds = sorted({r["seed"] for r in runs if all((v, r["seed"]) in by for v in variants)})  # complete seeds
    left_out = [r for r in runs if r["seed"] not in seeds]
    runs = [r for r in runs if r["seed"] in seeds]
    lines = [
        "| run | model.onnx | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | vs dense (mean of per-seed) |",
        "| --- | --- |" + " --- |" * len(seeds) + " --- | --- |",
    ]
    for v in VARIANTS:
        accs = [by[(v, s)]["top1"]["onnxruntime"] * 100 if (v, s) in by else None for s in seeds]
        have = [a for a in accs if a is not None]
        if not have:
            continue
        diffs = [
            (by[(v, s)]["top1"]["onnxruntime"] - by[("dense", s)]["top1"]["onnxruntime"]) * 100
            for s in seeds
            if (v, s) in by and ("dense", s) in by
        ]
        prec = next(by[(v, s)]["onnx_precision"] for s in seeds if (v, s) in by)
        cells = " | ".join("-" if a is None else f"{a:.2f} %" for a in accs)
        vs = "-" if v == "dense" or not diffs else f"{statistics.mean(diffs):+.2f} points (worst {min(diffs):+.2f})"
        lines.append(f"| {v} | {prec} | {cells} | {statistics.mean(have):.2f} % | {vs} |")
    levels = sorted({str(r.get("onnxruntime_graph_optimization")) for r in runs})
    changed = ", ".join(f"{k}={v}" for k, v in results.get("model_overrides", {}).items())
    lines += [
        "",
        f"{results['recipe']}"
        + (f" with model {changed}" if changed else " as shipped")
        + f", {results['max_steps']} steps per run, {runs[0].get('samples')} validation images; "
        f"{results['machine']}, torch {results['torch']}; ONNX Runtime graph optimization level(s) used by the "
        f"validation: {', '.join(levels)}."
        + (f" Not shown: {len(left_out)} run(s) of a seed not run for every variant." if left_out else ""),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-steps", type=int, help="shorter schedule (a quick check of this script)")
    ap.add_argument("--patch", type=int, help="model.init_args.patch (e.g. 2: 16 patch tokens instead of 8 rows)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out, run only the missing ones")
    ap.add_argument("--table", type=Path, help="print the Markdown table of a results JSON")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    import torch

    model = {} if args.patch is None else {"patch": args.patch}
    results: dict[str, Any] = {
        "recipe": RECIPE.name,
        "model_overrides": model,
        "max_steps": args.max_steps or yaml.safe_load(RECIPE.read_text())["trainer"]["max_steps"],
        "machine": f"{platform.machine()} CPU, {args.threads} torch thread(s), nice 10",
        "torch": torch.__version__,
        "runs": [],
    }
    if args.resume and args.out and args.out.exists():
        previous = json.loads(args.out.read_text())
        if previous.get("model_overrides", {}) != model or previous["max_steps"] != results["max_steps"]:
            raise SystemExit(f"{args.out} holds another configuration: cannot resume it with these arguments")
        results["runs"] = [r for r in previous["runs"] if "error" not in r]
    done = {(r["variant"], r["seed"]) for r in results["runs"]}
    for seed in args.seeds:  # variants interleaved within each seed
        for v in args.variants:
            if (v, seed) in done:
                continue
            results["runs"].append(run(v, seed, args.threads, args.max_steps, model))
            r = results["runs"][-1]
            print(v, seed, r.get("top1", r.get("error", "")[-500:]), f"{r['seconds']:.0f} s", flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
