"""Magnitude kept by 2:4 with and without channel permutation, and how long the search takes.

For each model: the share of ``|w|`` that 2:4 keeps over all prunable layers (those
``TwoFourSparsity`` would prune, the classifier excluded), plain and after
:func:`~qatsparse.sparsity.permutation.permute_for_2to4`, per layer too, the search time (wall and
process CPU) on the chosen device, and the layers left unpermuted with the reason. torchvision models
have random weights (nothing is downloaded); ``digits`` is the example ResidualCNN trained dense on
the bundled digits for 400 steps (as the digits recipe does before pruning). ``--ablation`` also
runs the search's steps one by one on the trained digits model's channel groups.

    PYTHONPATH=. nice -n 10 python benchmarks/permutation_search.py --device cpu --threads 2 \\
        --out benchmarks/results/permutation_search_cpu.json
    PYTHONPATH=. python benchmarks/permutation_search.py --device cuda \\
        --out benchmarks/results/permutation_search_h200.json
    PYTHONPATH=. python benchmarks/permutation_search.py table --json benchmarks/results/permutation_search_cpu.json \\
        --doc docs/sparsity.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from qatsparse.sparsity import find_prunable
from qatsparse.sparsity.magnitude import kept_magnitude, overall
from qatsparse.sparsity.permutation import SearchConfig, find_channel_groups, permute_for_2to4, search_permutation
from qatsparse.sparsity.permutation.apply import reader_matrix

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["digits", "resnet18", "resnet50", "mobilenet_v3_large", "convnext_tiny", "vit_b_16"]
BEGIN, END = "<!-- permutation-search:begin -->", "<!-- permutation-search:end -->"
ABLATION = {
    "swaps, coarse rows only": SearchConfig(exact=False, exhaustive_budget=0),
    "swaps (default: coarse, then exact)": SearchConfig(exhaustive_budget=0),
    "+ 35-way stripe pairs, budget 5e7 (default)": SearchConfig(),
    "+ 35-way stripe pairs, budget 1e9": SearchConfig(exhaustive_budget=1e9),
    "+ 20 escapes": SearchConfig(exhaustive_budget=1e9, escapes=20),
}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    if name == "digits":
        return trained_digits(), torch.randn(2, 1, 8, 8)
    kwargs = {"image_size": 64} if name.startswith("vit") else {}
    return torchvision.models.get_model(name, num_classes=1000, **kwargs).eval(), torch.randn(2, 3, 64, 64)


def trained_digits() -> torch.nn.Module:
    import pytorch_lightning as pl

    from qatsparse.examples import DigitsDataModule, ResidualCNN

    pl.seed_everything(0)
    model = ResidualCNN()
    pl.Trainer(
        max_steps=400,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    ).fit(model, DigitsDataModule(batch_size=32))
    return model.eval()


def measure(name: str, device: str) -> dict[str, Any]:
    model, x = build(name)
    model, x = model.to(device), x.to(device)
    pruned = list(find_prunable(model, exclude=[r"^(fc|classifier|heads?)\b"]).eligible)
    plain = kept_magnitude(model, pruned)
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    result = permute_for_2to4(model, (x,), pruned)
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = kept_magnitude(model, pruned)
    return {
        "model": name,
        "layers_pruned": len(pruned),
        "layers_permuted": len(result.plan.permuted_layers),
        "kept_plain": overall(plain).share,
        "kept_permuted": overall(after).share,
        "search_wall_s": round(wall, 2),
        "search_cpu_s": round(cpu, 2),
        "groups_searched": len(result.groups),
        "largest_group": max((g.size for g in result.groups), default=0),
        "layers": {n: {"plain": plain[n].share, "permuted": after[n].share} for n in pruned},
        "not_permuted": result.plan.not_permuted,
    }


def ablation(device: str) -> list[dict[str, Any]]:
    model = trained_digits().to(device)
    pruned = list(find_prunable(model, exclude=["fc"]).eligible)
    plan = find_channel_groups(model, (torch.randn(2, 1, 8, 8, device=device),), pruned)
    mats = [reader_matrix(model, g) for g in plan.groups if g.permutable]
    rows = []
    for label, cfg in ABLATION.items():
        before = after = total = 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        for m in mats:
            _, st = search_permutation(m, cfg)
            before, after, total = before + st.kept_before, after + st.kept_after, total + st.total
        rows.append(
            {
                "search": label,
                "config": cfg.__dict__,
                "kept_plain": before / total,
                "kept_permuted": after / total,
                "wall_s": round(time.perf_counter() - wall, 2),
                "cpu_s": round(time.process_time() - cpu, 2),
            }
        )
        print(rows[-1], flush=True)
    return rows


def table(data: dict[str, Any]) -> str:
    lines = [
        f"Generated by `benchmarks/permutation_search.py table` from `{data['json']}` ({data['machine']}, "
        f"torch {data['torch']}, {data['date']}). Share of `|w|` kept by 2:4 over the pruned layers "
        "(classifier excluded); random weights except `digits` (trained).",
        "",
        "| model | pruned layers | permuted | kept, plain 2:4 | kept, permuted | gain (points) | search wall s | "
        "search CPU s | largest group |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["models"]:
        lines.append(
            f"| {r['model']} | {r['layers_pruned']} | {r['layers_permuted']} | {100 * r['kept_plain']:.2f}% | "
            f"{100 * r['kept_permuted']:.2f}% | +{100 * (r['kept_permuted'] - r['kept_plain']):.2f} | "
            f"{r['search_wall_s']} | {r['search_cpu_s']} | {r['largest_group']} |"
        )
    if data.get("ablation"):
        lines += [
            "",
            "The search's steps on the trained digits model's channel groups (same JSON):",
            "",
            "| search | kept, permuted | gain (points) | wall s | CPU s |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in data["ablation"]:
            lines.append(
                f"| {r['search']} | {100 * r['kept_permuted']:.3f}% | "
                f"+{100 * (r['kept_permuted'] - r['kept_plain']):.3f} | {r['wall_s']} | {r['cpu_s']} |"
            )
    return "\n".join(lines)


def write_table(json_path: Path, doc: Path) -> None:
    data = json.loads(json_path.read_text())
    data["json"] = str(json_path.relative_to(ROOT))
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{table(data)}\n{END}{tail}")


def main() -> None:
    if sys.argv[1:2] == ["table"]:
        tab = argparse.ArgumentParser()
        tab.add_argument("table")
        tab.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/permutation_search_cpu.json")
        tab.add_argument("--doc", type=Path, default=ROOT / "docs/sparsity.md")
        a = tab.parse_args()
        write_table(a.json.resolve(), a.doc)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--quick", action="store_true", help="digits and resnet18 only (a smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/permutation_search_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    models = ["digits", "resnet18"] if args.quick else args.models
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "CPU"
    data: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{device_name}, {args.threads} CPU threads",
        "device": args.device,
        "torch": torch.__version__,
        "search_config": SearchConfig().__dict__,
        "models": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in models:
        data["models"].append(measure(name, args.device))
        r = data["models"][-1]
        print(f"{name}: {r['kept_plain']:.4%} -> {r['kept_permuted']:.4%} in {r['search_wall_s']} s", flush=True)
        args.out.write_text(json.dumps(data, indent=1))
    if args.ablation:
        data["ablation"] = ablation(args.device)
        args.out.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
