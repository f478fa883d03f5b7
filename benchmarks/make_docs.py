"""Writes docs/BENCHMARKS.md from benchmarks/BENCHMARKS.md.in and the raw results in benchmarks/results/.

Every number on that page comes from a JSON (or pytest JUnit XML) file in ``benchmarks/results/``; the
template holds the prose and ``{{name}}`` placeholders that this script fills. Paired training runs
(``"protocol": "paired-rounds/1"``, written by ``benchmarks/train_overhead.py``) are found by their
content, whatever their file name, and give the per-target verdicts; earlier single-pass training files
are shown only for models that no paired run covers.

    python benchmarks/make_docs.py            # rewrite docs/BENCHMARKS.md
    python benchmarks/make_docs.py --check    # exit 1 if docs/BENCHMARKS.md is not what this script writes

Output depends only on the files (sorted by name), so it is byte-for-byte reproducible
(``tests/test_benchmark_protocol.py`` checks the committed page).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEMPLATE = ROOT / "benchmarks" / "BENCHMARKS.md.in"
DOC = ROOT / "docs" / "BENCHMARKS.md"
PAIRED = "paired-rounds/1"
MIN_ROUNDS = 5  # a ratio from fewer rounds gets no verdict

MODEL_NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "vit_b_16": "ViT-B/16"}
TARGET_MODELS = ("resnet50", "resnet18", "vit_b_16")
LANE_TEXT = {
    "amp": "AMP, eager",
    "amp_24": "AMP + 2:4, eager",
    "amp_24_qat": "AMP + 2:4 + INT8 QAT, eager",
    "c_amp": "AMP, compiled",
    "c_amp_24": "AMP + 2:4, compiled",
    "c_amp_24_qat": "AMP + 2:4 + INT8 QAT, compiled, recompute=False",
    "mo_24": "ModelOpt 2:4, eager",
    "mo_qat": "ModelOpt INT8 QAT, eager",
    "mo_24_qat": "ModelOpt 2:4 + INT8 QAT, eager",
    "c_amp_24_qat_rc": "AMP + 2:4 + INT8 QAT, compiled, recompute=True",
    "amp_24_qat_sel": "AMP + 2:4 + INT8 QAT, eager, select backward (tried, removed)",
}


@dataclass(frozen=True)
class Target:
    """A target of issue 15: ``ratio`` (candidate/baseline) of ``kind`` ("time" or "memory") <= ``limit``."""

    what: str
    ratio: str
    kind: str
    limit: float


TARGETS = (
    Target(
        "2:4 + INT8 QAT step (the default, recompute=True), compiled vs compiled AMP",
        "c_amp_24_qat_rc/c_amp",
        "time",
        1.10,
    ),
    Target("peak memory of that step vs compiled AMP", "c_amp_24_qat_rc/c_amp", "memory", 1.15),
    Target("2:4 + INT8 QAT step with recompute=False, compiled vs compiled AMP", "c_amp_24_qat/c_amp", "time", 1.10),
    Target("peak memory of that step (recompute=False) vs compiled AMP", "c_amp_24_qat/c_amp", "memory", 1.15),
    Target("2:4 masks alone, compiled vs compiled AMP", "c_amp_24/c_amp", "time", 1.03),
    Target("2:4 + INT8 QAT step, eager vs eager AMP", "amp_24_qat/amp", "time", 1.8),
)


# ---------------------------------------------------------------------- loading
def load_results(results: Path = RESULTS) -> dict[str, Any]:
    """Every raw file in ``results``, by file name (JSON parsed; JUnit XML summarised)."""
    out: dict[str, Any] = {}
    for path in sorted(results.glob("*.json")):
        out[path.name] = json.loads(path.read_text())
    for path in sorted(results.glob("*.xml")):
        out[path.name] = junit_summary(path)
    return out


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts of a pytest ``--junitxml`` file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["timestamp"] = suites[0].get("timestamp", "") if suites else ""
    counts["hostname"] = suites[0].get("hostname", "") if suites else ""
    return counts


def paired_runs(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(n, r) for n, r in results.items() if isinstance(r, dict) and r.get("protocol") == PAIRED]


def _timed_lanes(rec: dict[str, Any]) -> int:
    return sum(1 for lane in rec.get("lanes", {}).values() if lane.get("median_ms") is not None)


def paired_models(results: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any], dict[str, Any]]]:
    """model -> (file, run, model record) of the newest paired run of that model (by its date; the later
    file name on a tie) among those that timed the compiled QAT lane and at least 3 lanes, the full
    benchmark of the code then (any run of the model where none did). Other runs: :func:`render_other_paired`."""
    best: dict[str, tuple[tuple[bool, str, str], tuple[str, dict[str, Any], dict[str, Any]]]] = {}
    for name, run in paired_runs(results):
        date = run.get("environment", {}).get("date", "")
        for arch, rec in run.get("models", {}).items():
            if not rec.get("rounds"):
                continue
            full = _timed_lanes(rec) >= 3 and rec.get("lanes", {}).get("c_amp_24_qat", {}).get("median_ms") is not None
            key = (full, date, name)
            if arch not in best or key >= best[arch][0]:
                best[arch] = (key, (name, run, rec))
    return {arch: chosen for arch, (_, chosen) in best.items()}


# ---------------------------------------------------------------------- formatting
def ms(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def x(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}×"


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def model_title(arch: str, batch: Any) -> str:
    return f"{MODEL_NAMES.get(arch, arch)}, b{batch}"


def spread(s: dict[str, Any]) -> str:
    return f"{s['min']:.3f}–{s['max']:.3f}"


def iqr(s: dict[str, Any]) -> str:
    return f"{s['q1']:.3f}–{s['q3']:.3f}"


# ---------------------------------------------------------------------- paired training runs
def environment_line(name: str, run: dict[str, Any]) -> str:
    env, gpu = run.get("environment", {}), run.get("gpu_start") or {}
    parts = [f"`benchmarks/results/{name}`", env.get("date", "?")]
    if gpu:
        parts.append(
            f"{gpu.get('name', env.get('gpu', '?'))}, driver {gpu.get('driver_version', '?')}, "
            f"SM clock {gpu.get('clocks.sm', '?')} of {gpu.get('clocks.max.sm', '?')} MHz and memory clock "
            f"{gpu.get('clocks.mem', '?')} MHz at the start, {gpu.get('temperature.gpu', '?')} °C"
        )
    else:
        parts.append(f"device {run.get('device', '?')}")
    parts.append(
        f"torch {env.get('torch', '?')}, CUDA {env.get('cuda', '–')}, Lightning {env.get('lightning', '?')}, "
        f"ModelOpt {run.get('modelopt') or 'not installed'}"
    )
    s = run.get("settings", {})
    parts.append(
        f"{s.get('rounds', '?')} rounds of {s.get('block_steps', '?')}-step blocks after "
        f"{s.get('warmup', '?')} warm-up steps per lane"
    )
    return "; ".join(parts) + f". Command: `{run.get('command', '?')}`."


def clocks_line(rec: dict[str, Any]) -> str:
    clocks = [int(r["gpu"]["clocks.sm"]) for r in rec.get("rounds", []) if (r.get("gpu") or {}).get("clocks.sm")]
    if not clocks:
        return ""
    return f"SM clock read after each round: {min(clocks)}–{max(clocks)} MHz."


def paired_model_section(arch: str, name: str, run: dict[str, Any], rec: dict[str, Any]) -> str:
    lanes = rec.get("lanes", {})
    rows = []
    for lane, r in lanes.items():
        if r.get("error"):
            rows.append([LANE_TEXT.get(lane, lane), "–", "–", "–", f"failed: {r['error'][:120]}"])
            continue
        med = r.get("block_medians_ms") or []
        rows.append(
            [
                LANE_TEXT.get(lane, lane),
                ms(r.get("median_ms")),
                f"{ms(min(med))}–{ms(max(med))}" if med else "–",
                ms(r.get("peak_mem_gib")),
                f"setup {r['setup_s']:.0f} s" if r.get("setup_s") is not None else "",
            ]
        )
    out = [f"**{model_title(arch, rec.get('batch'))}** ({len(rec.get('rounds', []))} rounds, `{name}`)", ""]
    out.append(table(["lane", "median ms", "block medians ms (min–max)", "peak GiB (alone)", "note"], rows, "lrrrl"))
    skipped = run.get("skipped_lanes") or {}
    if skipped:
        out += ["", "Not run: " + "; ".join(f"{LANE_TEXT.get(k, k)}: {v}" for k, v in sorted(skipped.items())) + "."]
    ratio_rows = []
    for s in rec.get("ratios", {}).values():
        if not s.get("n"):
            continue
        ratio_rows.append(
            [
                f"{LANE_TEXT.get(s['candidate'], s['candidate'])} / {LANE_TEXT.get(s['baseline'], s['baseline'])}",
                f"**{x(s['median'])}**",
                spread(s),
                iqr(s),
                str(s["n"]),
                x(s.get("memory_ratio")),
            ]
        )
    if ratio_rows:
        out += [
            "",
            table(["ratio (paired)", "median", "min–max", "IQR", "rounds", "peak memory"], ratio_rows, "lrrrrr"),
        ]
    cl = clocks_line(rec)
    if cl:
        out += ["", cl]
    if rec.get("stopped"):
        out += ["", f"Stopped early: {rec['stopped']}."]
    return "\n".join(out)


def profile_section(arch: str, rec: dict[str, Any]) -> str:
    parts = []
    for lane, r in rec.get("lanes", {}).items():
        rows = r.get("profile_top_ms_per_step") or []
        if not rows:
            continue
        top = [
            [f"`{p['name'][:90]}`", f"{p['calls_per_step']:.0f}", ms(p["self_device_ms"], 3), ms(p["self_cpu_ms"], 3)]
            for p in rows[:12]
        ]
        parts.append(
            f"Profile of {LANE_TEXT.get(lane, lane)} ({model_title(arch, rec.get('batch'))}), top rows by self "
            f"device time, per step (one block under `torch.profiler`):\n\n"
            + table(["operator / kernel", "calls", "self device ms", "self CPU ms"], top)
        )
    return "\n\n".join(parts)


def render_paired(results: dict[str, Any]) -> str:
    runs = paired_runs(results)
    if not runs:
        return (
            "No paired run is in `benchmarks/results/` yet. The GPU command is section `train` of "
            "`benchmarks/run_gpu.sh`; drop its JSON into `benchmarks/results/` and run "
            "`python benchmarks/make_docs.py`."
        )
    out = ["Runs:", ""] + [f"- {environment_line(n, r)}" for n, r in runs]
    for arch, (name, run, rec) in sorted(paired_models(results).items(), key=lambda kv: _model_order(kv[0])):
        out += ["", paired_model_section(arch, name, run, rec)]
        prof = profile_section(arch, rec)
        if prof:
            out += ["", prof]
    return "\n".join(out)


def _model_order(arch: str) -> tuple[int, str]:
    return (TARGET_MODELS.index(arch) if arch in TARGET_MODELS else len(TARGET_MODELS), arch)


def verdict(target: Target, rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "not measured (no paired run of this model)"
    s = rec.get("ratios", {}).get(target.ratio)
    if not s or not s.get("n"):
        return "not measured (a lane of this ratio did not run)"
    if target.kind == "memory":
        cand, base = target.ratio.split("/")
        pc, pb = rec["lanes"][cand].get("peak_mem_gib"), rec["lanes"][base].get("peak_mem_gib")
        if not pc or not pb:
            return "not measured (no peak memory on this device)"
        ok = pc / pb <= target.limit
        return f"**{'met' if ok else 'not met'}**: {pc / pb:.3f}× ({pc:.2f} vs {pb:.2f} GiB, each measured alone)"
    if s["n"] < MIN_ROUNDS:
        return f"not measured ({s['n']} rounds, fewer than {MIN_ROUNDS})"
    ok = s["median"] <= target.limit
    note = ""
    if ok and s["max"] > target.limit:
        note = "; the slowest round was above the target"
    elif not ok and s["min"] <= target.limit:
        note = "; the fastest round was within the target"
    return (
        f"**{'met' if ok else 'not met'}**: median {s['median']:.3f}× "
        f"(min–max {spread(s)}, IQR {iqr(s)}, {s['n']} rounds){note}"
    )


def _measured(target: Target, rec: dict[str, Any]) -> bool:
    s = rec.get("ratios", {}).get(target.ratio)
    return bool(s and s.get("n"))


def render_targets(results: dict[str, Any]) -> str:
    """Per target and model: the verdict of the run shown above, or, where that run did not measure the
    ratio, of the newest other paired run that did (named)."""
    models = paired_models(results)
    newest_first = sorted(
        paired_runs(results), key=lambda nr: (nr[1].get("environment", {}).get("date", ""), nr[0]), reverse=True
    )
    out = []
    for t in TARGETS:
        out.append(f"- **{t.what} ≤ {t.limit:.2f}×**")
        for arch in TARGET_MODELS:
            rec = models[arch][2] if arch in models else None
            where = ""
            if rec is None or not _measured(t, rec):
                for name, run in newest_first:
                    other = run.get("models", {}).get(arch)
                    if other and _measured(t, other):
                        when = run.get("environment", {}).get("date", "")
                        shown = models[arch][1].get("environment", {}).get("date", "") if arch in models else ""
                        rel = "a later run" if when > shown else "an earlier run"
                        rec, where = other, f" (from `{name}`, {rel})"
                        break
            out.append(f"  - {MODEL_NAMES[arch]}: {verdict(t, rec)}{where}")
    return "\n".join(out)


def render_other_paired(results: dict[str, Any]) -> str:
    """The paired runs not shown above: earlier runs of a model and spot checks of a few lanes."""
    shown = {(name, arch) for arch, (name, _, _) in paired_models(results).items()}
    rows = []
    for name, run in paired_runs(results):
        date = run.get("environment", {}).get("date", "")[:16]
        for arch, rec in run.get("models", {}).items():
            if (name, arch) in shown:
                continue
            for ratio, st in rec.get("ratios", {}).items():
                if not st.get("n"):
                    continue
                cand, base = ratio.split("/")
                lanes = rec["lanes"]
                rows.append(
                    [
                        f"`{name}`",
                        date,
                        MODEL_NAMES.get(arch, arch),
                        f"{LANE_TEXT.get(cand, cand)} / {LANE_TEXT.get(base, base)}",
                        f"{ms(lanes[cand].get('median_ms'))} / {ms(lanes[base].get('median_ms'))}",
                        f"**{x(st['median'])}**",
                        spread(st),
                        iqr(st),
                        str(st["n"]),
                    ]
                )
    if not rows:
        return "None."
    header = ["file", "date", "model", "ratio (paired)", "median ms", "median", "min–max", "IQR", "rounds"]
    return table(header, rows, "lllllrrrr")


def render_health_overhead(results: dict[str, Any], name: str = "health_overhead_cpu.json") -> str:
    """``benchmarks/health_overhead.py``: host time of the health check per step, both callbacks watching."""
    r = results.get(name)
    if not r:
        return "No run yet (`python benchmarks/health_overhead.py --out benchmarks/results/health_overhead_cpu.json`)."
    rows = [
        [
            MODEL_NAMES.get(arch, arch),
            str(m["parameters"]),
            ms(m["walk_ms"]),
            ms(m["before_ms"]),
            ms(m["now_ms"]),
            f"{m['saved_ms_min_max'][0]:.2f}–{m['saved_ms_min_max'][1]:.2f}",
        ]
        for arch, m in r["models"].items()
    ]
    header = ["model (quantized)", "parameters", "module walk ms", "step before ms", "step now ms"]
    header.append("saved ms (min–max)")
    return (
        f"`benchmarks/results/{name}` ({r['environment']['date']}, {r['device']}, medians of {r['rounds']} "
        f"interleaved rounds of {r['reps']} steps; `{r['command']}`). On the CPU the norms themselves are most of "
        "both columns; on a GPU they are one small kernel:\n\n" + table(header, rows)
    )


# ---------------------------------------------------------------------- inference
def render_inference(results: dict[str, Any], name: str = "inference_h200.json") -> str:
    data = results.get(name)
    if not data:
        return f"(`benchmarks/results/{name}` is missing.)"
    first = next(iter(data["models"].values()))
    dev, ver = first["device"], first["versions"]
    out = [
        f"`benchmarks/results/{name}`: {data['date']}, {dev.get('gpu', 'CPU')}, driver {dev.get('driver', '–')}, "
        f"torch {ver.get('torch', '?')}, CUDA {dev.get('cuda', '–')}, onnxruntime {ver.get('onnxruntime', '?')}.",
        "",
    ]
    for model, rec in data["models"].items():
        shape = tuple(rec["settings"]["input_shapes"][0])
        rows = [
            [
                r["backend"],
                str(r["batch_size"]),
                r["precision"],
                ms(r["latency_ms"]["median"], 3),
                ms(r["latency_ms"]["p90"], 3),
                ms(r["latency_ms"]["p99"], 3),
                f"{r['throughput_per_s']:.0f}",
                _how(r),
            ]
            for r in rec["results"]
        ]
        out += [
            f"**{model}** (input {shape})",
            "",
            table(
                ["backend", "batch", "precision", "median ms", "p90 ms", "p99 ms", "samples/s", "how"], rows, "lrlrrrrl"
            ),
            "",
        ]
    return "\n".join(out).rstrip()


def _how(r: dict[str, Any]) -> str:
    return r.get("memory_format") or r.get("provider") or ""


def render_inference_reading(results: dict[str, Any], name: str = "inference_h200.json") -> str:
    data = results.get(name)
    if not data or "resnet50" not in data["models"]:
        return ""
    rows = {(r["backend"], r["batch_size"]): r for r in data["models"]["resnet50"]["results"]}
    b = max(bs for _, bs in rows)
    fp32, fp16, qat = (rows.get((k, b)) for k in ("pytorch_fp32", "pytorch_fp16", "pytorch_qat"))
    if not (fp32 and fp16 and qat):
        return ""
    t32, t16, tq = fp32["throughput_per_s"], fp16["throughput_per_s"], qat["throughput_per_s"]
    return (
        f"Reading: for ResNet-50 at batch {b}, FP16 gives {t16 / t32:.2f}× the FP32 throughput "
        f"({t16 / 1e3:.1f} k vs {t32 / 1e3:.1f} k images/s). The QAT model's fake quantization is a training-time "
        f"emulation: it runs at {tq / t32:.2f}× the FP32 throughput ({tq / 1e3:.1f} k/s) and says nothing about "
        "deployed INT8 speed, which only a TensorRT engine shows."
    )


# ---------------------------------------------------------------------- earlier single-pass training runs
EARLIER = (
    ("train_compiled_cpp_h200.json", "train_vit_compiled_cpp_h200.json"),
    ("train_eager_h200.json", "train_vit_eager_h200.json"),
)
EARLIER_CONFIGS = ("fp32", "amp", "amp_24", "amp_qat", "amp_24_qat")
EARLIER_HEADER = ["model", "fp32", "amp", "amp + 2:4", "amp + INT8 QAT", "amp + 2:4 + INT8 QAT"]
EARLIER_HEADER.append("peak GiB amp → 2:4+QAT")


def render_earlier(results: dict[str, Any]) -> str:
    covered = set(paired_models(results))
    out = []
    for files in EARLIER:
        rows, sources = [], []
        for f in files:
            data = results.get(f)
            if not data:
                continue
            by_model: dict[str, dict[str, dict[str, Any]]] = {}
            for r in data["results"]:
                by_model.setdefault(r["model"], {})[r["config"]] = r
            for model, cfgs in by_model.items():
                if model in covered or "amp" not in cfgs:
                    continue
                sources.append(f"`{f}` ({data['environment']['date']})")
                amp = cfgs["amp"]["median_ms"]
                cells = []
                for c in EARLIER_CONFIGS:
                    r = cfgs.get(c)
                    if r is None or "median_ms" not in r:
                        cells.append("–")
                    elif c in ("fp32", "amp"):
                        cells.append(f"{r['median_ms']:.2f} ms")
                    else:
                        cells.append(f"{r['median_ms']:.2f} ms ({r['median_ms'] / amp:.3f}×)")
                peak = f"{cfgs['amp']['peak_mem_gib']:.2f} → {cfgs.get('amp_24_qat', {}).get('peak_mem_gib', 0):.2f}"
                rows.append([model_title(model, cfgs["amp"]["batch"]), *cells, peak])
        if not rows:
            continue
        compiled = "compiled" in files[0]
        title = "Compiled (`TORCHINDUCTOR_CPP_WRAPPER=1` for every configuration)" if compiled else "Eager (no compile)"
        out += [
            f"**{title}**, from {', '.join(dict.fromkeys(sources))}:",
            "",
            table(EARLIER_HEADER, rows, "lrrrrrl"),
            "",
        ]
    if not out:
        return "Every model of the earlier single-pass runs has been measured again with the paired protocol above."
    return "\n".join(out).rstrip()


# ---------------------------------------------------------------------- DDP, GPU tests
def render_ddp(results: dict[str, Any], name: str = "ddp_2xh200.json") -> str:
    d = results.get(name)
    if not d:
        return f"(`benchmarks/results/{name}` is missing.)"
    a, single, ddp = d["args"], d["single"], d["ddp"]
    masks = {g["masks"][:8] for g in ddp["digests"]}
    amax = {g["amax"][:8] for g in ddp["digests"]}
    same = "bit-identical on all ranks" if ddp["identical"] else "NOT identical across ranks"
    return (
        f"`python3 benchmarks/ddp_check.py --devices {a['devices']} --warmup {a['warmup']} --steps {a['steps']}` "
        f"({d['environment']['date']}, {a['devices']}× {d['environment'].get('gpu', '?')}, "
        f"`benchmarks/results/{name}`). ResNet-18, per-GPU batch {a['batch']}, `16-mixed`, eager.\n\n"
        f"- Masks and amax are **{same}**: the SHA-256 of all masks starts `{'/'.join(sorted(masks))}…` and of "
        f"all amax values `{'/'.join(sorted(amax))}…` on every rank.\n"
        f"- QAT step: {single['median_ms']:.2f} ms on 1 GPU and {ddp['median_ms']:.2f} ms on {ddp['devices']} GPUs "
        f"at the same per-GPU batch, a weak-scaling efficiency of {d['weak_scaling_efficiency']:.2f} "
        "(one run of each, not paired)."
    )


def render_fsdp(results: dict[str, Any]) -> str:
    """Every ``fsdp*.json`` of ``benchmarks/fsdp_check.py``: one row per run."""
    runs = [(n, r) for n, r in results.items() if n.startswith("fsdp") and isinstance(r, dict) and "fsdp" in r]
    if not runs:
        return "No run yet (`benchmarks/run_gpu.sh fsdp` writes `fsdp.json`)."
    rows = []
    for name, d in runs:
        a, env, multi, trip = d["args"], d["environment"], d["fsdp"], d["resume"]
        n = a["devices"]
        cpu = f"{n} CPU processes, gloo ({env.get('cpu_count', '?')} cores)"
        where = f"{n}× {env['gpu']}" if env.get("gpu") else cpu
        plain = bool(a.get("plain"))
        if plain:
            same = resumed = "— (no qatsparse callbacks)"
        else:
            digest = multi["digests"][0]
            same = f"yes (`{digest['masks'][:8]}…` / `{digest['amax'][:8]}…`)" if multi["identical"] else "**no**"
            resumed = "yes" if trip["bit_identical"] else "**no**"
            if "repeatable" in trip:  # the control: the same steps twice without a checkpoint
                resumed += f" (the same run twice: {'identical' if trip['repeatable'] else 'different'})"
        export = d.get("export", {})
        exported = "— (no qatsparse callbacks)" if plain else "not checked in this run"
        if "files_equal" in export:
            differ = [f for f, same in export["files_equal"].items() if not same]
            exported = "**no**: " + ", ".join(differ) if differ else "yes"
            if not differ and not export.get("agreement_equal", True):
                exported = "files byte-equal; **the reports' agreement blocks differ**"
        rows.append([
            f"`{name}` ({env['date'][:10]})",
            where,
            f"b{a['batch']}, {a['image_size']}², {a['steps']} timed steps, units: {a.get('wrap', 'none')}",
            ("FP32" if not env.get("gpu") else "AMP") + (" only (FSDP baseline)" if plain else " + 2:4 + INT8 QAT"),
            same,
            resumed,
            exported,
            f"{d['single']['median_ms']:.2f}",
            f"{multi['median_ms']:.2f}",
            f"{d['weak_scaling_efficiency']:.2f}",
        ])  # fmt: skip
    header = ["run", "devices", "ResNet-18", "step", "masks / amax identical on every rank (SHA-256)",
              "resume bit-identical", "export equal to a single-process export", "step, 1 device (ms)",
              "step, FSDP (ms)", "weak-scaling efficiency"]  # fmt: skip
    return table(header, rows, "lllllllrrr")


def render_ddp_strides(results: dict[str, Any]) -> str:
    runs = [(n, r) for n, r in results.items() if n.startswith("ddp_strides") and isinstance(r, dict)]
    if not runs:
        return "No run yet (`benchmarks/run_gpu.sh ddp1` writes `ddp_strides_1gpu.json`)."
    out = []
    for name, r in runs:
        s = r["settings"]
        lanes = r["lanes"]
        out.append(
            f"`benchmarks/results/{name}` ({r['environment']['date']}, {r['environment'].get('gpu', 'CPU')}): "
            f"{s['model']}, batch {s['batch']}, {s['rounds']} rounds of {s['block_steps']} steps. Gradients laid "
            "out unlike their weight, per lane: "
            + ", ".join(f"`{n}` {len(lane['mismatched_grads'])}" for n, lane in lanes.items())
            + "."
        )
        rows = [
            [k, f"**{x(v['median'])}**", spread(v), iqr(v), str(v["n"])] for k, v in r["ratios"].items() if v.get("n")
        ]
        out += ["", table(["ratio (paired)", "median", "min–max", "IQR", "rounds"], rows)]
    return "\n".join(out)


def render_saved_tensors(results: dict[str, Any]) -> str:
    runs = [(n, r) for n, r in results.items() if n.startswith("saved_tensors") and isinstance(r, dict)]
    if not runs:
        return "No run yet (`python benchmarks/saved_tensors.py --out ...`)."
    out = []
    for name, r in runs:
        v = r["variants"]
        amp = v.get("amp", {}).get("activation_bytes")
        extra = any("extra_vs_amp" in d for d in v.values())

        def beyond(d: dict[str, Any]) -> str:  # "bfloat16 +15, bool +17": tensors kept beyond AMP's, by dtype
            by: dict[str, int] = {}
            for kind, n in d.get("extra_vs_amp", {}).items():
                dtype = kind.split()[0]
                by[dtype] = by.get(dtype, 0) + n
            return ", ".join(f"{t} +{n}" for t, n in sorted(by.items())) or "–"

        rows = [
            [
                f"`{k}`",
                f"{d['activation_bytes'] / 2**10:.1f}",
                x(d["activation_bytes"] / amp) if amp else "–",
                ", ".join(f"{n} {t}" for t, n in d["activation_tensors_by_dtype"].items()),
            ]
            + ([beyond(d)] if extra else [])
            for k, d in v.items()
        ]
        out += [""] if out else []
        out += [
            f"`benchmarks/results/{name}` ({r['environment']['date']}, {r['device']}, {r['model']}, batch "
            f"{r['batch']}, {r['image_size']}×{r['image_size']}; `{r['command']}`):",
            "",
            table(
                ["variant", "activations kept, KiB", "vs AMP", "tensors kept"] + (["beyond AMP's"] if extra else []),
                rows,
                "lrrl" + ("l" if extra else ""),
            ),
        ]
    return "\n".join(out)


def render_gpu_tests(results: dict[str, Any]) -> str:
    runs = [(n, r) for n, r in results.items() if n.endswith(".xml")]
    if not runs:
        return (
            "No GPU test report is in `benchmarks/results/` yet (`benchmarks/run_gpu.sh tests` writes `gpu_tests.xml`)."
        )
    return "\n".join(
        f"- `benchmarks/results/{n}` ({r['timestamp']}): {r['passed']} passed, {r['skipped']} skipped, "
        f"{r['failures']} failed, {r['errors']} errors."
        for n, r in runs
    )


# ---------------------------------------------------------------------- page
SECTIONS = {
    "paired": render_paired,
    "targets": render_targets,
    "other_paired": render_other_paired,
    "health_overhead": render_health_overhead,
    "inference": render_inference,
    "inference_reading": render_inference_reading,
    "earlier": render_earlier,
    "ddp": render_ddp,
    "ddp_strides": render_ddp_strides,
    "fsdp": render_fsdp,
    "saved_tensors": render_saved_tensors,
    "gpu_tests": render_gpu_tests,
}


def render(template: str | None = None, results: dict[str, Any] | None = None) -> str:
    """The page: ``template`` with every ``{{name}}`` replaced by its section."""
    template = TEMPLATE.read_text() if template is None else template
    results = load_results() if results is None else results

    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in SECTIONS:
            raise KeyError(f"unknown placeholder {{{{{name}}}}} in {TEMPLATE.name}; known: {sorted(SECTIONS)}")
        return SECTIONS[name](results)

    return re.sub(r"\{\{(\w+)\}\}", fill, template)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when the page differs")
    a = p.parse_args(argv)
    page = render()
    if a.check:
        same = DOC.exists() and DOC.read_text() == page
        print(f"{DOC.relative_to(ROOT)} is {'up to date' if same else 'NOT what make_docs.py writes'}")
        return 0 if same else 1
    DOC.write_text(page)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
