"""Turn the coverage matrix JSON into ``docs/COVERAGE.md`` (per-zoo pass rate, failures by cause, per-model tables).

Failures are grouped by cause: the first entry of ``benchmarks/coverage_causes.yaml`` whose ``match``
regex is found in ``"<model id> | <error type>: <message> | <where>"`` names the cause (one line) and the
library's code behind it; an error no entry matches is its own cause (its type and first line).
The output is a pure function of the JSON and that file (``tests/test_coverage.py`` checks the committed
doc against it)::

    PYTHONPATH=. .venv/bin/python benchmarks/coverage_doc.py
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_JSON = ROOT / "benchmarks/results/coverage_cpu.json"
DEFAULT_DOC = ROOT / "docs/COVERAGE.md"
#: the previous full run (before the FP16 conversion kept the models' own float32 regions), kept as the record
EARLIER_JSON = ROOT / "benchmarks/results/coverage_cpu_earlier.json"
CAUSES = HERE / "coverage_causes.yaml"
ZOOS = ("torchvision", "timm", "transformers")
RERUN = "make coverage"


def load_causes(path: Path = CAUSES) -> list[dict[str, str]]:
    """The curated causes: a list of ``{match, cause, diagnosis}`` (``diagnosis`` optional)."""
    entries = yaml.safe_load(path.read_text()) or []
    for e in entries:
        if not {"match", "cause"} <= set(e):
            raise ValueError(f"{path}: every entry needs 'match' and 'cause', got {e}")
        re.compile(e["match"])
    return entries


def signature(record: Mapping[str, Any]) -> str:
    err = record.get("error") or {}
    return f"{record['id']} | {err.get('type')}: {_message(err)} | {err.get('where_qatsparse') or err.get('where')}"


def _message(err: Mapping[str, Any]) -> str:
    """The error message without the run's temporary folder (it changes from run to run)."""
    return re.sub(r"\S*/qatsparse-coverage-[^/\s]+/[^/\s]+/", "<workdir>/", str(err.get("message")))


def error_line(record: Mapping[str, Any]) -> str:
    """The error as one line: ``Type: message (at where, stage)``."""
    err = record.get("error") or {}
    where = err.get("where_qatsparse") or err.get("where")
    at = ", ".join(x for x in (f"at {where}" if where else "", f"during {err.get('stage')}") if x)
    return f"{err.get('type')}: {_message(err)}" + (f" ({at})" if at else "")


def cause_of(record: Mapping[str, Any], causes: list[dict[str, str]]) -> dict[str, str]:
    sig = signature(record)
    for e in causes:
        if re.search(e["match"], sig):
            return e
    err = record.get("error") or {}
    return {"cause": f"{err.get('type')}: {_message(err)}", "diagnosis": ""}


NA = "n/a"


def _pct(x: float | None) -> str:
    return NA if x is None else f"{100 * x:.0f}%" if x in (0, 1) else f"{100 * x:.1f}%"


def _vacuous(r: dict[str, Any]) -> bool:
    """A pass whose PyTorch logits are the same for every sample: the cosine compares constants."""
    return r["status"] == "pass" and _constant(r)


def _constant(r: dict[str, Any]) -> bool:
    return (r.get("agreement") or {}).get("torch_logit_spread") == 0


def _passes_on_fp32_qdq(r: dict[str, Any]) -> bool | None:
    """Whether the model meets the thresholds with the FP32 Q/DQ graph's cosine in place of ``model.onnx``'s
    (None: no such measurement)."""
    a = r.get("agreement") or {}
    if not r.get("onnx") or a.get("cosine_qdq_fp32") is None:
        return None
    from coverage_run import check  # the matrix's own thresholds

    return not check({**r, "agreement": {**a, "cosine": a["cosine_qdq_fp32"]}})


def _num(x: float | None, fmt: str) -> str:
    return NA if x is None else format(x, fmt)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _by_zoo(results: list[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {z: [] for z in ZOOS}
    for r in sorted(results, key=lambda r: (ZOOS.index(r["zoo"]), r["name"])):
        out[r["zoo"]].append(r)
    return out


def render(data: Mapping[str, Any], causes: list[dict[str, str]], json_name: str) -> str:
    """The markdown of ``docs/COVERAGE.md`` for the matrix ``data``."""
    results = list(data["results"])
    zoos = _by_zoo(results)
    failures = [r for r in results if r["status"] != "pass"]
    groups: dict[str, dict[str, Any]] = {}
    for r in failures:
        c = cause_of(r, causes)
        g = groups.setdefault(c["cause"], {"entry": c, "models": []})
        g["models"].append(r)
    ranked = sorted(groups.values(), key=lambda g: (-len(g["models"]), g["entry"]["cause"]))
    number = {id(r): i for i, g in enumerate(ranked, 1) for r in g["models"]}

    n_pass = sum(r["status"] == "pass" for r in results)
    not_run = data.get("not_run") or {}
    lines = [
        "# Coverage matrix: third-party models through prune → QAT → export → ONNX Runtime",
        "",
        f"Generated by `benchmarks/coverage_doc.py` from `{json_name}`; do not edit by hand.",
        f"Re-run the matrix and regenerate this page (one command, a few hours on 2 CPU cores): `{RERUN}`",
        "(`--only NAME...` re-runs some models and keeps the others; `--resume` runs the models not yet in the JSON).",
        "",
        "Every model -- each torchvision classification builder, timm models across families and Hugging Face",
        "`transformers` encoders built from small configs, all with random weights -- goes through the real callbacks",
        "in a Lightning `Trainer`: `TwoFourSparsity(start_step=1)`, `QuantizationAwareTraining(precision='int8',",
        "calib_batches=2, start_step=2)`, `TensorRTExport` at fit end; 4 SGD steps (lr 1e-3, momentum 0.9) on random",
        "data, batches of 4, 10 classes. Text models take `input_ids` and an `attention_mask` with padding. Each model",
        "runs in its own process with a time limit and a memory budget, so a crash is a recorded failure.",
        "",
        "The cosine of these random-weight networks is fragile: FP16's rounding in `model.onnx` flips int8 levels that",
        "PyTorch's FP32 fake quantization keeps, and a random network compounds the flips layer by layer while the",
        "same Q/DQ graph in FP32 still agrees (C1 below, `benchmarks/coverage_study.py`). Neither clipping the",
        "gradients (norm 1.0) nor setting BatchNorm's running statistics to the training data's before step 0",
        "(`QATSPARSE_COVERAGE_SETTLE_BN=1`; the builders' initial mean 0 and variance 1 otherwise) makes it reliable:",
        "the latter moves some models above 0.99 and others below. Without it some networks lose their signal in eval",
        "mode and give every sample the same logits, which agree trivially (`torch_logit_spread` 0 in the JSON).",
        *_earlier(data),
        "",
        "A model **passes** when the run goes through and `model.onnx` meets issue 11's acceptance thresholds:",
        "every layer TensorRT could run 2:4 (*eligible*) is 2:4, at least 50 % of the weighted layers are fed by",
        "Q/DQ, and ONNX Runtime (CPU, at the graph-optimization level qatsparse's validation chose: the default",
        "unless ONNX Runtime's integer kernels change the graph's numbers) agrees with the PyTorch QAT model at",
        "cosine ≥ 0.99 on 8 validation samples. Parameters that turned NaN/inf in training fail the model too.",
        "",
        "## Pass rate",
        "",
        "| zoo | models | pass | of which constant logits | fail | pass rate |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for z, rows in zoos.items():
        p = sum(r["status"] == "pass" for r in rows)
        c = sum(_vacuous(r) for r in rows)
        lines.append(f"| {z} | {len(rows)} | {p} | {c} | {len(rows) - p} | {_pct(p / len(rows) if rows else None)} |")
    n_vacuous = sum(_vacuous(r) for r in results)
    lines.append(f"| **all** | {len(results)} | {n_pass} | {n_vacuous} | {len(results) - n_pass} | "
                 f"{_pct(n_pass / len(results) if results else None)} |")  # fmt: skip
    if n_vacuous:
        lines += [
            "",
            f"*Constant logits*: {n_vacuous} passing models give every validation sample the same logits in eval",
            "mode (`torch_logit_spread` 0 to 6 decimals: the random network's signal dies; with BatchNorm statistics",
            "set to the data's they do not, see above), so their cosine of 1.0 says nothing about the export; their",
            "2:4 and Q/DQ shares still hold. Their rows say *pass (constant logits)*.",
        ]
    on_qdq = {id(r): _passes_on_fp32_qdq(r) for r in results}
    measured = [r for r in results if on_qdq[id(r)] is not None]
    if measured:
        alt = [r for r in measured if on_qdq[id(r)]]
        lines += [
            "",
            "*For comparison, not issue 11's gate*: with the cosine of the FP32 Q/DQ graph (the export without FP16's",
            f"rounding) in place of `model.onnx`'s, {len(alt)} of the {len(measured)} models that have it pass "
            f"({_pct(len(alt) / len(measured))}; {sum(_constant(r) for r in alt)} of them with "
            "constant logits).",
        ]
    if not_run.get("models"):
        lines += [
            "",
            f"Not run ({len(not_run['models'])} models, not counted above): {not_run['why']}: "
            + ", ".join(f"`{m}`" for m in not_run["models"])
            + ".",
        ]
    lines += ["", "## Failures by cause", ""]
    if not ranked:
        lines.append("None.")
    for i, g in enumerate(ranked, 1):
        e, models = g["entry"], g["models"]
        lines.append(f"### C{i}. {_md(e['cause'])} ({len(models)} model{'s' if len(models) > 1 else ''})")
        lines.append("")
        if e.get("diagnosis"):
            lines += [f"Where: {_md(e['diagnosis'])}", ""]
        lines.append("Models: " + ", ".join(f"`{r['id']}`" for r in models))
        lines.append("")
        seen: list[str] = []
        for r in models:
            line = error_line(r)
            if line not in seen:
                seen.append(line)
        for line in seen[:3]:
            lines.append(f"- `{_md(line)}`")
        if len(seen) > 3:
            lines.append(f"- … {len(seen) - 3} more variant(s) of the message in the JSON")
        lines.append("")
    for z, rows in zoos.items():
        lines += [f"## {z}", ""]
        lines.append(
            "| model | input | result | 2:4 share | eligible share | Q/DQ-fed layers | cosine | cosine, FP32 Q/DQ "
            "| top-1 | CPU s |"
        )
        lines.append("|---|---|---|--:|--:|--:|--:|--:|--:|--:|")
        for r in rows:
            o, a = r.get("onnx") or {}, r.get("agreement") or {}
            result = "pass" if r["status"] == "pass" else f"fail ([C{number[id(r)]}](#failures-by-cause))"
            if _vacuous(r):
                result = "pass (constant logits)"
            cells = [
                f"`{r['name']}`",
                _md(r.get("input", "")) + (f" ({_md(r['settings'])})" if r.get("settings") else ""),
                result,
                _pct(o.get("share_2to4")),
                _pct(o.get("eligible_share")),
                _pct(o.get("qdq_fed_share")),
                _num(a.get("cosine"), ".5f"),
                _num(a.get("cosine_qdq_fp32"), ".5f"),
                _pct(a.get("top1_agreement")),
                _num(r.get("cpu_s", r.get("time_s")), ".0f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += _definitions() + _runs(data)
    return "\n".join(lines).rstrip() + "\n"


def _earlier(data: Mapping[str, Any], path: Path = EARLIER_JSON) -> list[str]:
    """Whether this page's runs set BatchNorm's statistics, and the previous full run (when its JSON is there)."""
    runs = {r.get("run") for r in data["results"]} - {None}
    settled = sum(bool(data["runs"][i]["settings"].get("settle_batchnorm")) for i in runs)
    out = [f"Runs behind this page that set BatchNorm's statistics: {settled} of {len(runs)}."]
    if path.exists():
        results = json.loads(path.read_text())["results"]
        n_pass = sum(r["status"] == "pass" for r in results)
        out.append(
            f"The previous full run, `{path.relative_to(ROOT)}`, passed {n_pass} of {len(results)} models "
            f"({_pct(n_pass / len(results))})."
        )
    return out


def _definitions() -> list[str]:
    return [
        "## What the columns mean",
        "",
        "Measured on `model.onnx` itself (`benchmarks/coverage_onnx.py`), not on qatsparse's records. A *weighted",
        "layer* is a Conv, Gemm or MatMul node whose weight is computed from constants only; its weight is evaluated",
        "as the node consumes it.",
        "",
        "- **2:4 share**: share of the weight parameters in layers whose weights have ≥ 2 zeros in every group of 4",
        "  along the reduction axis.",
        "- **eligible share**: share of the weight parameters in layers TensorRT could run 2:4: Conv with `group=1`,",
        "  Gemm, MatMul with a 2-D weight, output channels a multiple of 8 and reduction length a multiple of 16",
        "  (the rule of apex ASP / ModelOpt, which qatsparse applies too). Depthwise/grouped convs, the 3-channel",
        "  stem and the 10-class head are not eligible. A pass needs 2:4 share = eligible share or more.",
        "- **Q/DQ-fed layers**: share of the weighted layers whose activation and weight both come from a",
        "  DequantizeLinear (layout ops in between allowed).",
        "- **cosine**, **top-1**: ONNX Runtime on `model.onnx` against the PyTorch QAT model (fake quantization),",
        "  flattened logits of 8 random samples; top-1 is the share of samples with the same arg-max (random-weight",
        "  models have near-tied logits, so top-1 is shown, not gated). The JSON also holds the level used",
        "  (`ort_level`), the cosine at the default level and with the optimizations off, and `torch_logit_spread`",
        "  (the logits' standard deviation across the samples: 0 when every sample gives the same logits -- the signal",
        "  died in the random network -- and the cosine measures nothing).",
        "- **cosine, FP32 Q/DQ**: the same comparison for the Q/DQ graph before its FP16 conversion (the export",
        "  without FP16's rounding; not gated). It is shown for the models of runs that kept that graph.",
        "- **CPU s**: CPU time of the model's process (build, 4 steps, export, validation, measurement), one torch",
        "  thread; a crashed or killed process shows its wall time.",
        "",
    ]


def _runs(data: Mapping[str, Any]) -> list[str]:
    lines = ["## Runs behind this page", ""]
    used = sorted({r.get("run") for r in data["results"] if r.get("run") is not None})
    for i in used:
        run = data["runs"][i]
        m, v = run["machine"], run["versions"]
        n = sum(r.get("run") == i for r in data["results"])
        lines.append(f"- {run['date']}: {n} model(s), `{_md(run['command'])}`")
        lines.append(
            f"  on {m['cpu']} ({m['cores']} cores), {_md(m['system'])}; settings {json.dumps(run['settings'])}"
        )
        lines.append("  " + ", ".join(f"{k} {v[k]}" for k in sorted(v)))
    return [*lines, ""]


def write_doc(json_path: Path = DEFAULT_JSON, doc_path: Path = DEFAULT_DOC, causes_path: Path = CAUSES) -> str:
    data = json.loads(Path(json_path).read_text())
    try:
        name = str(Path(json_path).resolve().relative_to(ROOT))
    except ValueError:
        name = Path(json_path).name
    text = render(data, load_causes(causes_path), name)
    Path(doc_path).write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--out", type=Path, default=DEFAULT_DOC)
    args = p.parse_args(argv)
    write_doc(args.json, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
