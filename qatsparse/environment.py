"""The machine and the library versions that produced a result (for reports, benchmarks and build facts)."""

from __future__ import annotations

import platform
import shutil
import subprocess
from typing import Any

__all__ = ["device_info", "library_versions"]


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced the artifacts (absent ones are skipped)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in (
        "qatsparse",
        "torch",
        "torchvision",
        "pytorch-lightning",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "torchmetrics",
        "tensorrt",
        "polygraphy",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    out.update({k: v for k, v in device_info().items() if k in ("cuda", "gpu", "driver")})
    return out


def _nvidia_driver() -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        res = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
        return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_info() -> dict[str, Any]:
    """The machine: CPU, and where CUDA is available the GPU name, compute capability, driver and CUDA version.

    Example:
        >>> "cpu" in device_info()
        True
    """
    import torch

    out: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        out.update(
            {
                "gpu": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "gpu_memory_gb": round(props.total_memory / (1 << 30), 1),
                "cuda": str(torch.version.cuda),
                "cudnn": str(torch.backends.cudnn.version()),
            }
        )
        driver = _nvidia_driver()
        if driver:
            out["driver"] = driver
    return out
