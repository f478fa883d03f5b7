"""Where the cosine of a coverage-matrix model goes: the harness's training variants, FP32 Q/DQ graph vs model.onnx.

Runs one model of the matrix in this process as ``benchmarks/coverage_run.py`` does, under a variant of the
harness, and measures three cosines on the 8 validation samples: ``model.onnx`` (FP16 remainder) against the
PyTorch QAT model (the matrix's number), the same Q/DQ graph before its FP16 conversion against PyTorch (the
export alone), and ``model.onnx`` against that FP32 Q/DQ graph (the FP16 conversion alone). Variants:

* ``raw``: 4 SGD steps, BatchNorm's running statistics as initialised (the matrix before ``SETTLE_BATCHNORM``);
* ``clip``: the same with Lightning's ``gradient_clip_val=1.0`` (norm clipping, as fine-tuning recipes do);
* ``settle``: BatchNorm's running statistics set to the training data's before step 0 (the matrix's harness);
* ``settle_clip``: both.

One JSON line per run is appended to ``--out`` (with the loss and gradient norm of each step)::

    nice -n 10 env PYTHONPATH=. .venv/bin/python benchmarks/coverage_study.py timm:mobilenetv3_small_050 \\
        --variant raw clip settle --out benchmarks/results/coverage_study_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = ("raw", "clip", "settle", "settle_clip")


def study(model_id: str, variant: str, seed: int = 0) -> dict[str, Any]:
    """Run ``model_id`` under ``variant`` (one of :data:`VARIANTS`) and return its cosines."""
    import coverage_run
    import torch
    from coverage_zoo import find

    import qatsparse.artifacts as artifacts

    work = Path(tempfile.mkdtemp(prefix="qatsparse-study-"))
    seen: dict[str, Any] = {}
    write_fp16, ort_outputs, agree = artifacts._write_fp16, coverage_run._ort_outputs, coverage_run.agreement
    settle, seed_everything = coverage_run.SETTLE_BATCHNORM, coverage_run.pl.seed_everything
    data_cls, trainer_cls = coverage_run.RandomData, coverage_run.pl.Trainer

    def keep_qdq(src: Path, dst: Path, *args: Any, **kwargs: Any) -> None:  # the FP32 Q/DQ graph, before FP16
        shutil.copyfile(src, work / "qdq_fp32.onnx")
        write_fp16(src, dst, *args, **kwargs)

    def outputs(path: Path, inputs: Any, level: str, threads: int) -> Any:
        out = ort_outputs(path, inputs, level, threads)
        if Path(path).name == "model.onnx" and "fp16" not in seen:
            seen["fp16"], seen["qdq"] = out, ort_outputs(work / "qdq_fp32.onnx", inputs, level, threads)
        return out

    def first_agreement(a: Any, b: Any) -> dict[str, Any]:
        seen.setdefault("torch", b)
        return agree(a, b)

    artifacts._write_fp16, coverage_run._ort_outputs, coverage_run.agreement = keep_qdq, outputs, first_agreement
    coverage_run.SETTLE_BATCHNORM = variant.startswith("settle")
    coverage_run.pl.seed_everything = lambda _s, verbose=False: seed_everything(seed, verbose=verbose)
    coverage_run.RandomData = lambda spec, n_classes: data_cls(spec, n_classes, seed=seed)  # type: ignore[assignment]
    clip = {"gradient_clip_val": 1.0} if variant.endswith("clip") else {}
    coverage_run.pl.Trainer = lambda **kw: trainer_cls(**kw, **clip)  # type: ignore[assignment]
    try:
        torch.set_num_threads(1)
        rec = coverage_run.run_model(find(model_id), work, threads=1)
    finally:
        artifacts._write_fp16, coverage_run._ort_outputs, coverage_run.agreement = write_fp16, ort_outputs, agree
        coverage_run.SETTLE_BATCHNORM, coverage_run.pl.seed_everything = settle, seed_everything
        coverage_run.pl.Trainer, coverage_run.RandomData = trainer_cls, data_cls
        shutil.rmtree(work, ignore_errors=True)
    row = {
        "id": model_id,
        "variant": variant,
        "seed": seed,
        "status": rec["status"],
        "cosine": (rec.get("agreement") or {}).get("cosine"),
        "error": (rec.get("error") or {}).get("message"),
        "losses": rec.get("losses"),
        "grad_norms": rec.get("grad_norms"),
        "cpu_s": rec.get("cpu_s"),
    }
    if "qdq" in seen:
        row["cosine_qdq_fp32_vs_torch"] = round(agree(seen["qdq"], seen["torch"])["cosine"], 6)
        row["cosine_fp16_vs_qdq_fp32"] = round(agree(seen["fp16"], seen["qdq"])["cosine"], 6)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model ids, e.g. timm:mobilenetv3_small_050")
    p.add_argument("--variant", nargs="+", choices=VARIANTS, default=list(VARIANTS[:3]))
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="seeds of the weights and the data")
    p.add_argument("--out", type=Path, required=True, help="JSON lines, appended")
    args = p.parse_args(argv)
    for model_id in args.models:
        for seed in args.seed:
            for variant in args.variant:
                row = study(model_id, variant, seed)
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
