"""Does channel permutation change accuracy? 2:4 with and without ``permute``, several seeds, on CPU.

Two experiments on scikit-learn's bundled digits (nothing downloaded):

* ``recipe``: the shipped ``digits_int8_sparse`` recipe end to end (dense 400 steps, 2:4 at step 400,
  retraining, INT8 QAT at 700, export at 840), ``TwoFourSparsity(permute=False|True)``; accuracy of the
  exported INT8 + 2:4 ONNX model (ONNX Runtime) and of the dense reference, from ``report.json``.
* ``oneshot``: the recipe's model (and a 2x wider one) trained dense for 400 steps, then pruned 2:4
  with and without the permutation and evaluated with no fine-tuning at all and after a short
  fine-tuning (``--finetune`` steps at 1/10 of the learning rate) -- where the permutation should
  matter most.

Every run's numbers go to the JSON (``--out``); ``table`` turns that JSON into the table of
docs/sparsity.md::

    PYTHONPATH=. nice -n 10 python benchmarks/permutation_study.py run --out benchmarks/results/permutation_study.json
    PYTHONPATH=. python benchmarks/permutation_study.py table --json benchmarks/results/permutation_study.json \
        --doc docs/sparsity.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml

from qatsparse import TwoFourSparsity
from qatsparse.examples import DigitsDataModule, ResidualCNN
from qatsparse.sparsity import find_prunable, prune_2to4
from qatsparse.sparsity.magnitude import kept_magnitude, overall
from qatsparse.sparsity.permutation import permute_for_2to4

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits_int8_sparse.yaml"
BEGIN, END = "<!-- permutation-study:begin -->", "<!-- permutation-study:end -->"


# ---------------------------------------------------------------------------------------------- recipe
def run_recipe(seed: int, permute: bool, workdir: Path) -> dict[str, Any]:
    """The shipped digits recipe with ``permute`` set; numbers from its report.json."""
    from qatsparse.cli import run_cli

    cfg = yaml.safe_load(RECIPE.read_text())
    out = workdir / f"recipe_s{seed}_p{int(permute)}"
    cfg["seed_everything"] = seed
    cfg["trainer"]["default_root_dir"] = str(out)
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("TwoFourSparsity"):
            cb["init_args"]["permute"] = permute
            cb["init_args"]["verbose"] = False
        if cb["class_path"].endswith("TensorRTExport"):
            cb["init_args"]["dirpath"] = str(out)
    path = workdir / f"recipe_s{seed}_p{int(permute)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    run_cli(["fit", "--config", str(path)])
    report = json.loads((out / "report.json").read_text())
    b = report["backends"]
    kept = report["sparsity"].get("kept_magnitude", {}).get("overall", {})
    return {
        "experiment": "recipe",
        "model": "digits_int8_sparse",
        "seed": seed,
        "permute": permute,
        "acc_dense_fp32": b["pytorch_fp32"]["metrics"].get("top1"),
        "acc_pytorch_qat": b.get("pytorch_qat", {}).get("metrics", {}).get("top1"),
        "acc_onnx_int8_2to4": b["onnxruntime"]["metrics"].get("top1"),
        "kept_plain": kept.get("plain"),
        "kept_permuted": kept.get("permuted"),
        "search_seconds": (report["sparsity"].get("permutation") or {}).get("search_seconds"),
        "passed": report["passed"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------------------------- one-shot
def _trainer(steps: int, callbacks: list | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
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
def evaluate(model: torch.nn.Module, val: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    model.eval()
    logits = model(val[0])
    return {
        "acc": float((logits.argmax(1) == val[1]).float().mean()),
        "loss": float(F.cross_entropy(logits, val[1])),
    }


def run_oneshot(seed: int, widths: tuple[int, ...], dense_steps: int, finetune: int) -> list[dict[str, Any]]:
    """Train dense, then prune with/without permutation: accuracy at 0 and ``finetune`` steps."""
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    val = tuple(torch.cat(t) for t in zip(*dm.val_dataloader()))
    pl.seed_everything(seed)
    dense = ResidualCNN(widths=widths, lr=0.1)
    _trainer(dense_steps).fit(dense, dm)
    base = evaluate(dense, val)
    rows = []
    for permute in (False, True):
        model = copy.deepcopy(dense)
        pruned = list(find_prunable(model, exclude=["fc"]).eligible)
        plain = overall(kept_magnitude(model, pruned))
        t0 = time.perf_counter()
        if permute:
            permute_for_2to4(model, (val[0][:2],), pruned)
        seconds = time.perf_counter() - t0
        after = overall(kept_magnitude(model, pruned))
        prune_2to4(model, exclude=["fc"])
        row = {
            "experiment": "oneshot",
            "model": f"ResidualCNN{list(widths)}",
            "seed": seed,
            "permute": permute,
            "acc_dense_fp32": base["acc"],
            "loss_dense_fp32": base["loss"],
            "kept_plain": plain.share,
            "kept_permuted": after.share if permute else None,
            "search_seconds": round(seconds, 2) if permute else None,
        }
        row.update({f"{k}_ft0": v for k, v in evaluate(model, val).items()})
        # Short fine-tuning from the dense weights, the callback pruning (and permuting) at step 0.
        pl.seed_everything(seed + 1000)
        ft = ResidualCNN(widths=widths, lr=0.01)
        ft.load_state_dict(dense.state_dict())
        _trainer(finetune, [TwoFourSparsity(start_step=0, exclude=["fc"], permute=permute, verbose=False)]).fit(ft, dm)
        row.update({f"{k}_ft{finetune}": v for k, v in evaluate(ft, val).items()})
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- table
def _mean_sd(values: list[float], scale: float = 100.0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(data: dict[str, Any]) -> str:
    rows = data["runs"]
    lines = [
        f"Generated by `benchmarks/permutation_study.py table` from `{data['json']}` "
        f"({data['machine']}, torch {data['torch']}, {data['date']}; mean ± sd over seeds {data['seeds']}). Commands:",
        "",
        *(f"- {exp}: `{cmd}`" for exp, cmd in sorted(data.get("commands", {}).items())),
        "",
        "| experiment | model | permute | kept |w| (plain 2:4) | kept |w| (used) | dense acc % | accuracy % | loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for exp, metrics in (("recipe", [("acc_onnx_int8_2to4", "INT8+2:4 ONNX after the recipe")]), ("oneshot", None)):
        models = sorted({r["model"] for r in rows if r["experiment"] == exp})
        for model in models:
            for permute in (False, True):
                sel = [r for r in rows if r["experiment"] == exp and r["model"] == model and r["permute"] == permute]
                if not sel:
                    continue
                kept_used = [r["kept_permuted"] if permute else r["kept_plain"] for r in sel]
                if exp == "recipe":
                    stages = metrics
                else:
                    ft = data["finetune"]
                    stages = [("acc_ft0", "no fine-tuning"), (f"acc_ft{ft}", f"{ft} fine-tuning steps")]
                for key, label in stages:
                    loss_key = key.replace("acc", "loss")
                    loss = _mean_sd([r.get(loss_key) for r in sel], 1.0) if loss_key in sel[0] else "-"
                    lines.append(
                        f"| {exp}: {label} | {model} | {permute} | {_mean_sd([r['kept_plain'] for r in sel])} | "
                        f"{_mean_sd(kept_used)} | {_mean_sd([r['acc_dense_fp32'] for r in sel])} | "
                        f"{_mean_sd([r[key] for r in sel])} | {loss} |"
                    )
    paired = _paired(rows, data)
    if paired:
        lines += ["", "Paired differences (permute=True minus permute=False, same seed; mean ± sd, min..max):", ""]
        lines += [f"- {name}: {text}" for name, text in paired]
    return "\n".join(lines)


def _paired(rows: list[dict[str, Any]], data: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    keys = {"recipe": ["acc_onnx_int8_2to4"], "oneshot": ["acc_ft0", f"acc_ft{data['finetune']}"]}
    for exp, ks in keys.items():
        for model in sorted({r["model"] for r in rows if r["experiment"] == exp}):
            for k in ks:
                by_seed: dict[int, dict[bool, float]] = {}
                for r in rows:
                    if r["experiment"] == exp and r["model"] == model and r.get(k) is not None:
                        by_seed.setdefault(r["seed"], {})[r["permute"]] = r[k]
                diffs = [100 * (v[True] - v[False]) for v in by_seed.values() if len(v) == 2]
                if diffs:
                    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
                    out.append(
                        (
                            f"{exp} {model} {k}",
                            f"{statistics.mean(diffs):+.2f} ± {sd:.2f} points ({min(diffs):+.2f}..{max(diffs):+.2f}, "
                            f"{len(diffs)} seeds)",
                        )
                    )
    return out


def merge(parts: list[Path], out: Path, command: str | None = None) -> None:
    """One JSON from runs made in parallel processes (one per seed or experiment), same settings."""
    datas = [json.loads(p.read_text()) for p in parts]
    keys = ("dense_steps", "finetune")
    if any(tuple(d[k] for k in keys) != tuple(datas[0][k] for k in keys) for d in datas):
        raise SystemExit(f"merge: the parts differ in {keys}")
    data = {**datas[0], "seeds": sorted({s for d in datas for s in d["seeds"]}), "commands": {}, "runs": []}
    for d in datas:
        data["commands"].update(d.get("commands", {}))
        data["runs"] += d["runs"]
    if command:  # the one command that ran all the parts
        data["commands"] = {e: command for e in data["commands"]}
    data["machine"] = f"{datas[0]['machine']}, {len(parts)} processes in parallel"
    out.write_text(json.dumps(data, indent=1))


def write_table(json_path: Path, doc: Path) -> None:
    data = json.loads(json_path.read_text())
    data["json"] = str(json_path.relative_to(ROOT) if json_path.is_absolute() else json_path)
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{table(data)}\n{END}{tail}")


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/permutation_study.json")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    run.add_argument("--experiments", nargs="+", default=["oneshot", "recipe"], choices=["oneshot", "recipe"])
    run.add_argument(
        "--widths", default="32,64;64,128", help="ResidualCNN widths of the one-shot models, ';'-separated"
    )
    run.add_argument("--dense-steps", type=int, default=400)
    run.add_argument("--finetune", type=int, default=50)
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--quick", action="store_true", help="one seed, 100 dense steps, the smaller model: a smoke test")
    tab = sub.add_parser("table")
    mrg = sub.add_parser("merge", help="one JSON from the JSONs of runs made in parallel")
    mrg.add_argument("parts", type=Path, nargs="+")
    mrg.add_argument("--out", type=Path, required=True)
    mrg.add_argument("--command", help="the command that ran all the parts, recorded instead of theirs")
    tab.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/permutation_study.json")
    tab.add_argument("--doc", type=Path, default=ROOT / "docs/sparsity.md")
    args = parser.parse_args()
    if args.cmd == "table":
        write_table(args.json.resolve(), args.doc)
        return
    if args.cmd == "merge":
        merge(args.parts, args.out, args.command)
        return
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.dense_steps, args.finetune, args.widths = args.seeds[:1], 100, 10, "32,64"
    widths = [tuple(int(w) for w in ws.split(",")) for ws in args.widths.split(";")]
    data: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} CPU threads",
        "torch": torch.__version__,
        "seeds": args.seeds,
        "dense_steps": args.dense_steps,
        "finetune": args.finetune,
        "commands": {},
        "runs": [],
    }
    if args.out.exists():  # runs of the other experiment are kept: each experiment can be (re)run alone
        old = json.loads(args.out.read_text())
        data["commands"] = old.get("commands", {})
        data["runs"] = [r for r in old.get("runs", []) if r["experiment"] not in args.experiments]
    command = "PYTHONPATH=. nice -n 10 python benchmarks/permutation_study.py " + " ".join(sys.argv[1:])
    data["commands"].update({e: command for e in args.experiments})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            if "oneshot" in args.experiments:
                for w in widths:
                    data["runs"] += run_oneshot(seed, w, args.dense_steps, args.finetune)
                    args.out.write_text(json.dumps(data, indent=1))
            if "recipe" in args.experiments:
                for permute in (False, True):
                    data["runs"].append(run_recipe(seed, permute, Path(tmp)))
                    args.out.write_text(json.dumps(data, indent=1))
            print(f"seed {seed} done: {len(data['runs'])} runs in {args.out}", flush=True)


if __name__ == "__main__":
    main()
