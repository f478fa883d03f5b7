"""The flags trtexec and ``polygraphy run`` document, per release (:data:`TOOL_FLAGS_PATH`, with their sources;
``scripts/tool_flags.py`` regenerates it), and checking a command's words against them."""

from __future__ import annotations

import functools
import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The flags trtexec and ``polygraphy run`` document, per release, with their sources.
TOOL_FLAGS_PATH = Path(__file__).with_name("tool_flags.json")
#: The TensorRT releases build.sh targets (first, last), as in :data:`qatsparse.export.tensorrt.SUPPORTED_TENSORRT`.
TENSORRT_RANGE = ("10.0", "11.1")
#: The Polygraphy release check.sh is written for (its flags are checked against this release's parser).
POLYGRAPHY_VERSION = "0.53"


@functools.cache
def tool_flags() -> dict[str, Any]:
    """The contents of :data:`TOOL_FLAGS_PATH`."""
    return json.loads(TOOL_FLAGS_PATH.read_text())


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def trtexec_flags(major: int | None = None) -> dict[str, set[str]]:
    """{release: documented trtexec flags} for the releases in :data:`TENSORRT_RANGE` (one major if given).

    Example:
        >>> "--stronglyTyped" in trtexec_flags(10)["10.0.0"]
        True
    """
    lo, hi = (_version(v) for v in TENSORRT_RANGE)
    out = {}
    for v, entry in tool_flags()["trtexec"]["versions"].items():
        key = _version(v)
        if lo <= key[:2] <= hi and (major is None or key[0] == major):
            out[v] = set(entry["flags"])
    return out


def flag_name(arg: str) -> str | None:
    """The flag of a command-line word (``--sparsity=enable`` -> ``--sparsity``), None for a value.

    Example:
        >>> flag_name("--minShapes=input:1x3"), flag_name("engine")
        ('--minShapes', None)
    """
    return arg.split("=", 1)[0] if arg.startswith("-") and not _is_number(arg) else None


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def undocumented_flags(args: Sequence[str], documented: set[str]) -> list[str]:
    """The flags of ``args`` that ``documented`` does not list.

    Example:
        >>> undocumented_flags(["--onnx=m.onnx", "--fast"], {"--onnx"})
        ['--fast']
    """
    return [f for a in args if (f := flag_name(a)) is not None and f not in documented]


def command_lines(script: str, program: str) -> list[list[str]]:
    """The commands of a bundle script that run ``program`` (``"$TRTEXEC"``, ``"$POLYGRAPHY"``), each split with
    :func:`shlex.split` after joining continued lines (what the tests check flag by flag).

    Example:
        >>> command_lines('x=1\\n"$T" --a \\\\\\n  --b=2 2>&1 | tee log\\n', '"$T"')
        [['--a', '--b=2']]
    """
    joined = script.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        if line.lstrip().startswith(program):
            words = shlex.split(line.lstrip()[len(program) :], comments=True)
            words = words[: words.index("|")] if "|" in words else words
            out.append([w for w in words if not re.fullmatch(r"\d*[<>]&?\d*", w)])  # drop redirections
    return out
