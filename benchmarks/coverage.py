"""Coverage matrix: prune -> QAT -> export -> ONNX Runtime check over torchvision, timm and transformers.

Every model runs in its own process (``benchmarks/coverage_run.py``, forked from a server that imported the
libraries once) with a time limit and a memory
budget, so a segfault, a hang or an out-of-memory is a recorded failure and the matrix goes on. Each
result is written to the JSON as soon as it comes (a partial run is kept), then ``docs/COVERAGE.md`` is
regenerated from the JSON (``benchmarks/coverage_doc.py``).

Re-run the whole matrix (hours on 2 CPU cores) and regenerate the doc (``make coverage`` runs this)::

    nice -n 10 env PYTHONPATH=. .venv/bin/python benchmarks/coverage.py --fresh

Some models only (results of the others are kept), models not yet in the JSON, the CI subset::

    PYTHONPATH=. .venv/bin/python benchmarks/coverage.py --only 'torchvision:vit_*' swin_t
    PYTHONPATH=. .venv/bin/python benchmarks/coverage.py --resume
    PYTHONPATH=. .venv/bin/python benchmarks/coverage.py --subset ci --out /tmp/ci.json --doc ''

``QATSPARSE_COVERAGE_SETTLE_BN=1`` sets BatchNorm's running statistics to the training data's before step 0
(``SETTLE_BATCHNORM`` in ``benchmarks/coverage_run.py``; recorded in each run's settings).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from coverage_proc import run_isolated  # noqa: E402
from coverage_zoo import ModelSpec, all_specs, select  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks/results/coverage_cpu.json"
DEFAULT_DOC = ROOT / "docs/COVERAGE.md"


def _run_order(spec: ModelSpec) -> tuple[int, int]:
    """Small models first (a partial run then covers the most models): transformers, timm, then torchvision
    by its builders' parameter count."""
    size = 0
    if spec.zoo == "torchvision" and spec.classes is None:
        import torchvision

        size = next(iter(torchvision.models.get_model_weights(spec.name))).meta.get("num_params", 0)
    return ({"transformers": 0, "timm": 1}.get(spec.zoo, 2), size)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "timm", "transformers", "pytorch-lightning", "onnx", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    if os.environ.get("QATSPARSE_COMMIT"):  # a copy of the tree without .git (e.g. on a lent GPU machine)
        out["commit"] = os.environ["QATSPARSE_COMMIT"]
        return out
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "qatsparse"], cwd=ROOT, capture_output=True, text=True)
        last = subprocess.run(
            ["git", "log", "-1", "--format=%h %s", "--", "qatsparse"], cwd=ROOT, capture_output=True, text=True
        )
        out["commit"] = commit + (" (qatsparse/ modified)" if dirty.stdout.strip() else "")
        out["qatsparse_last_change"] = last.stdout.strip()[:100]
    except OSError:
        out["commit"] = "unknown"
    return out


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform(), "gpu": "none used (CPU run)"}


def _settle_batchnorm() -> bool:
    from coverage_run import SETTLE_BATCHNORM

    return SETTLE_BATCHNORM


def load(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": [], "results": []}


def save(data: dict[str, Any], path: Path) -> None:
    """Write atomically, results sorted by zoo and name (so diffs of re-runs are readable)."""
    from coverage_zoo import ZOOS

    data["results"].sort(key=lambda r: (ZOOS.index(r["zoo"]), r["name"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


#: Why a selected model has no record after a merge (the shards are cut by a time limit, largest models last).
NOT_RUN_WHY = (
    "the shards' time limit ended before these models finished (the largest models run last in each shard); "
    "`benchmarks/coverage.py --resume` adds them"
)


def merge(parts: list[Path], out: Path, expected: list[str] | None = None) -> None:
    """One results JSON from shards run at once (``--shard K/N``): their runs, and every model's record
    re-pointed at its shard's run; the models of ``expected`` (the shards' whole selection) that no shard
    recorded are listed under ``not_run``."""
    data: dict[str, Any] = {"runs": [], "results": []}
    for part in parts:
        d = load(part)
        offset = len(data["runs"])
        data["runs"] += d["runs"]
        for r in d["results"]:
            data["results"] = [x for x in data["results"] if x["id"] != r["id"]] + [{**r, "run": r["run"] + offset}]
    done = {r["id"] for r in data["results"]}
    missing = [m for m in expected or [] if m not in done]
    if missing:
        data["not_run"] = {"models": missing, "why": NOT_RUN_WHY}
    save(data, out)


def _line(i: int, n: int, r: dict[str, Any]) -> str:
    o, a = r.get("onnx") or {}, r.get("agreement") or {}
    head = f"[{i}/{n}] {r['id']:<45} {r['status']:<4} {r.get('time_s', 0):7.1f}s"
    if r["status"] == "pass" or o:
        share = o.get("share_2to4")
        cos = a.get("cosine")
        head += f"  2:4 {share if share is None else f'{share:.2f}'}  cos {cos if cos is None else f'{cos:.4f}'}"
    if r.get("error"):
        head += f"  {r['error']['type']}: {r['error']['message'][:120]}"
    return head


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", nargs="+", help="torchvision, timm and/or transformers (default: all)")
    p.add_argument("--only", nargs="+", help="model ids or names, fnmatch patterns (e.g. 'timm:vit_*' swin_t)")
    p.add_argument("--subset", choices=["ci"], help="the fixed CI subset")
    p.add_argument("--resume", action="store_true", help="skip models already in the JSON")
    p.add_argument("--fresh", action="store_true", help="start a new JSON (default: update the models run)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON")
    p.add_argument("--doc", default=str(DEFAULT_DOC), help="markdown to regenerate at the end ('' for none)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per model")
    p.add_argument("--max-rss-gb", type=float, default=10.0, help="memory budget per model (resident GB)")
    p.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads per model")
    p.add_argument("--workdir", type=Path, help="keep each model's artifacts here (default: a temporary folder)")
    p.add_argument("--list", action="store_true", help="print the selected models and exit")
    p.add_argument("--shard", help="K/N: only every N-th model starting at the K-th (0-based), for N processes at once")
    p.add_argument("--merge", type=Path, nargs="+", help="shard JSONs: merged into --out (and the doc)")
    args = p.parse_args(argv)
    if args.merge:  # --zoo/--only/--subset as the shards were given them: their selection
        merge(args.merge, args.out, [s.id for s in select(all_specs(), args.zoo, args.only, args.subset)])
        if args.doc:
            from coverage_doc import write_doc

            write_doc(args.out, Path(args.doc))
        return 0
    if args.resume and args.fresh:
        p.error("--resume and --fresh exclude each other")

    specs = sorted(select(all_specs(), args.zoo, args.only, args.subset), key=_run_order)
    if args.shard:
        k, n = (int(v) for v in args.shard.split("/"))
        if not 0 <= k < n:
            p.error(f"--shard {args.shard}: K must be in 0..N-1")
        specs = specs[k::n]  # round robin over the size order: every shard gets small and large models
    if args.list:
        print("\n".join(f"{s.id}  ({s.input_desc}{'; ' + s.note if s.note else ''})" for s in specs))
        return 0
    data = {"runs": [], "results": []} if args.fresh else load(args.out)
    done = {r["id"] for r in data["results"]}
    if args.resume:
        specs = [s for s in specs if s.id not in done]
    run = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv),
        "machine": _machine(),
        "versions": _versions(),
        "settings": {
            "timeout_s": args.timeout,
            "max_rss_gb": args.max_rss_gb,
            "threads": args.threads,
            "settle_batchnorm": _settle_batchnorm(),
        },
        "models": len(specs),
    }
    data["runs"].append(run)
    run_index = len(data["runs"]) - 1
    print(f"coverage: {len(specs)} model(s) -> {args.out}", flush=True)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="qatsparse-coverage-"))
    for i, spec in enumerate(specs, 1):
        workdir = root / spec.id.replace(":", "__")
        record = run_isolated(spec, workdir, args.timeout, args.max_rss_gb, args.threads)
        record["run"] = run_index
        data["results"] = [r for r in data["results"] if r["id"] != spec.id] + [record]
        save(data, args.out)
        print(_line(i, len(specs), record), flush=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.doc:
        from coverage_doc import write_doc

        write_doc(args.out, Path(args.doc))
        print(f"coverage: wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
