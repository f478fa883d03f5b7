"""Trial of PyTorch's torch.export-based ONNX exporter (``dynamo=True``) against the TorchScript one (``dynamo=False``)
on fake-quantized zoo models: does it export, with the same Q/DQ placement, and does ONNX Runtime agree as well?

For each model (random weights, no downloads): insert qatsparse's INT8 quantizers, calibrate on two random batches,
``prepare_for_onnx_export``, then export with each exporter at opset 19 with a dynamic batch axis (the dynamo
exporter also at a fixed batch, with and without its default graph optimization, to tell its failures apart), fold
constants (qatsparse's ``fold_constants``) and record: the error if the export fails; QuantizeLinear/DequantizeLinear
counts; how many Conv/Gemm/MatMul nodes have Q/DQ on both inputs and how many Add nodes on an input; INT8
initializers; lint errors; ONNX Runtime's agreement with the PyTorch QAT model (max abs error, cosine, top-1) at the
example batch (and at another batch size for dynamic-batch exports).

The dynamo exporter needs ``onnxscript`` (not a qatsparse dependency: ``pip install onnxscript``)::

    PYTHONPATH=. python benchmarks/exporter_trial.py --out benchmarks/results/exporter_trial.json [--quick]
    PYTHONPATH=. python benchmarks/exporter_trial.py --table benchmarks/results/exporter_trial.json  # docs/design.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata as md
import json
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from qatsparse.batches import as_outputs
from qatsparse.export.lint import lint as lint_onnx
from qatsparse.export.lint import lint_errors
from qatsparse.export.onnx import export_onnx, fold_constants
from qatsparse.export.runners import OnnxRuntimeRunner
from qatsparse.quantization import QuantConfig, calibrate, prepare_for_onnx_export, quantize_model

OPSET = 19


def _images(size: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    return lambda n: (torch.randn(n, 3, size, size),)


def _bert_inputs(n: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 1000, (n, 16), generator=g)
    mask = torch.ones(n, 16, dtype=torch.long)
    mask[:, 12:] = 0
    return ids, mask


class _Logits(nn.Module):
    """A transformers model's logits as a plain tensor output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def zoo(quick: bool) -> dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple[torch.Tensor, ...]]]]:
    import timm
    import torchvision
    from transformers import BertConfig, BertForSequenceClassification

    from qatsparse.examples import ResidualCNN

    def bert() -> nn.Module:
        cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=64, num_labels=3)  # fmt: skip
        return _Logits(BertForSequenceClassification(cfg))

    models = {
        "qatsparse ResidualCNN (digits)": (lambda: ResidualCNN(widths=(16, 32)), lambda n: (torch.randn(n, 1, 8, 8),)),
        "torchvision resnet18": (lambda: torchvision.models.resnet18(num_classes=10), _images(64)),
        "timm vit_tiny_patch16_224": (
            lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10),
            _images(64),
        ),
        "transformers BERT (small config)": (bert, _bert_inputs),
    }
    if not quick:
        for tv in ("mobilenet_v3_small",):
            models[f"torchvision {tv}"] = (lambda tv=tv: getattr(torchvision.models, tv)(num_classes=10), _images(64))
        for tm in ("convnext_atto", "efficientnet_b0"):
            models[f"timm {tm}"] = (lambda tm=tm: timm.create_model(tm, pretrained=False, num_classes=10), _images(64))
    return models


def _qdq_fed(graph: Any) -> tuple[int, int, int]:
    """(weighted nodes, of which with a DequantizeLinear -- through Transpose/Reshape -- on both inputs, Add nodes
    with a DequantizeLinear on an input: the residual quantizers)."""
    from qatsparse.export.graph import OnnxGraph

    og = OnnxGraph(graph)

    def dq(name: str) -> bool:
        src = og.source(name, ("Transpose", "Reshape", "Identity", "Cast"))
        return src is not None and src.op_type == "DequantizeLinear"

    weighted = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) >= 2]
    adds = sum(any(dq(i) for i in n.input) for n in graph.node if n.op_type == "Add")
    return len(weighted), sum(dq(n.input[0]) and dq(n.input[1]) for n in weighted), adds


def _graph_facts(path: Path) -> dict[str, Any]:
    proto = onnx.load(str(path))
    g = proto.graph
    ops = [n.op_type for n in g.node]
    weighted, fed, adds = _qdq_fed(g)
    return {
        "nodes": len(ops),
        "QuantizeLinear": ops.count("QuantizeLinear"),
        "DequantizeLinear": ops.count("DequantizeLinear"),
        "weighted_nodes": weighted,
        "weighted_nodes_qdq_fed": fed,
        "adds_qdq_fed": adds,
        "int8_initializers": sum(i.data_type == onnx.TensorProto.INT8 for i in g.initializer),
        "lint_errors": sorted({f.check for f in lint_errors(lint_onnx(path, check_sparsity=False))}),
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
    }


def _agreement(path: Path, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, float]:
    with torch.no_grad():
        ref = as_outputs(model(*inputs))[0].float()
    got = OnnxRuntimeRunner(path)(inputs)[0]
    a, b = got.double().flatten(), ref.double().flatten()
    return {
        "max_abs_err": float((a - b).abs().max()),
        "cosine": float(a @ b / (a.norm() * b.norm())),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
    }


def _export_dynamo(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    names: list[str],
    dynamic_batch: bool = True,
    optimize: bool = True,
) -> Path:
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic = tuple({0: batch} for _ in inputs) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        program = torch.onnx.export(model, inputs, dynamo=True, opset_version=OPSET, input_names=names,
                                    output_names=["output"], dynamic_shapes=dynamic, optimize=optimize)  # fmt: skip
    program.save(str(path))
    proto = fold_constants(onnx.load(str(path)))
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return path


def trial(name: str, build: Callable[[], nn.Module], make: Callable[[int], tuple], tmp: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build().eval()
    quantize_model(model, QuantConfig(precision="int8", calibrator="max"))
    calibrate(model, [make(8), make(8)], lambda b: model(*b))
    prepare_for_onnx_export(model)
    example, other = make(4), make(7)
    names = ["input_ids", "attention_mask"] if len(example) == 2 else ["input"]
    row: dict[str, Any] = {"model": name, "quantized_layers": sum(1 for n, _ in model.named_modules()
                                                                     if n.endswith("input_quantizer"))}  # fmt: skip
    # dynamo: a dynamic batch axis, as qatsparse exports; dynamo_static: the example's batch only (diagnosis);
    # dynamo_static_unoptimized: the same without the exporter's default graph optimization (optimize=False)
    for exporter in ("torchscript", "dynamo", "dynamo_static", "dynamo_static_unoptimized"):
        path = tmp / f"{exporter}.onnx"
        entry: dict[str, Any] = {}
        t0 = time.perf_counter()
        try:
            if exporter == "torchscript":
                export_onnx(copy.deepcopy(model), example, path, input_names=names, opset=OPSET)
            else:
                _export_dynamo(copy.deepcopy(model), example, path, names, dynamic_batch=exporter == "dynamo",
                               optimize=exporter != "dynamo_static_unoptimized")  # fmt: skip
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            entry.update(_graph_facts(path))
            entry["agreement_example_batch"] = _agreement(path, model, example)
            if not exporter.startswith("dynamo_static"):
                entry["agreement_other_batch"] = _agreement(path, model, other)
        except Exception as e:  # record exactly what fails
            text = str(e)
            cause = text[text.find("<class") :].split("\n")[0] if "<class" in text else text.split("\n")[0]
            entry["error"] = f"{type(e).__name__}: {cause[:600]}"
            entry["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
        row[exporter] = entry
    # the same Q/DQ placement: every weighted node and every residual add fed by Q/DQ in both graphs
    for exporter in ("dynamo", "dynamo_static", "dynamo_static_unoptimized"):
        ts, dy = row["torchscript"], row[exporter]
        keys = ("weighted_nodes_qdq_fed", "adds_qdq_fed")
        row[f"same_qdq_placement_{exporter}"] = "error" not in dy and all(ts.get(k) == dy.get(k) for k in keys)
    return row


def _cell(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return "fails"
    a = entry["agreement_example_batch"]
    return f"cos {a['cosine']:.6f}, top-1 {a['top1_agreement']:.2f}"


def table(result: dict[str, Any]) -> str:
    """The Markdown table docs/design.md shows (from the JSON this script wrote)."""
    head = ["model", "TorchScript (dynamic batch)", "dynamo, dynamic batch", "dynamo, fixed batch",
            "same Q/DQ placement", "dynamo, fixed batch, optimize=False"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in result["results"]:
        same = "yes" if r["same_qdq_placement_dynamo_static"] else "no"
        cells = [r["model"], _cell(r["torchscript"]), _cell(r["dynamo"]), _cell(r["dynamo_static"]), same,
                 _cell(r["dynamo_static_unoptimized"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="run the trial and write its JSON here")
    ap.add_argument("--quick", action="store_true", help="4 models instead of 7")
    ap.add_argument("--table", type=Path, help="print the Markdown table of a JSON this script wrote, and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    if args.out is None:
        ap.error("--out or --table is required")
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    versions = {}
    for pkg in ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "timm", "transformers", "torchvision"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    rows = []
    for name, (build, make) in zoo(args.quick).items():
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(trial(name, build, make, Path(tmp)))
        r = rows[-1]
        print(f"{name}: torchscript {r['torchscript'].get('error', 'ok')}; dynamo {r['dynamo'].get('error', 'ok')}; "
              f"static {r['dynamo_static'].get('error', 'ok')}; same Q/DQ placement (static): "
              f"{r['same_qdq_placement_dynamo_static']}", flush=True)  # fmt: skip
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "opset": OPSET,
        "versions": versions,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
