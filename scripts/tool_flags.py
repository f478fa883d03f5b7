"""Regenerate qatsparse/export/tool_flags.json: the command-line flags trtexec and `polygraphy run` document.

The hand-off bundle's build.sh (trtexec) and check.sh (Polygraphy) may use only flags listed there, for every
TensorRT release they say they target (tests/test_handoff.py checks it). Sources:

* trtexec: the help text in ``samples/common/sampleOptions.cpp`` of NVIDIA/TensorRT at each release tag from
  v10.0.0 to v11.1 (the text ``trtexec --help`` prints; a flag is documented when a help line starts with it).
* polygraphy run: the argparse parser of ``polygraphy run`` in the installed Polygraphy (0.53.6 when this was
  generated), i.e. what ``polygraphy run --help`` lists.

Usage: python scripts/tool_flags.py --tensorrt-repo /path/to/NVIDIA/TensorRT [--out qatsparse/export/tool_flags.json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

HELP_LINE = re.compile(r'"\s{2}(--[A-Za-z][A-Za-z0-9]*)((?:, --?[A-Za-z][A-Za-z0-9]*)*)')
FIRST, LAST = (10, 0), (11, 1)


def _tag_version(tag: str) -> tuple[int, ...] | None:
    m = re.fullmatch(r"v(\d+)\.(\d+)(?:\.(\d+))?", tag)
    return tuple(int(x) for x in m.groups() if x is not None) if m else None


def trtexec_flags(repo: Path) -> dict[str, dict]:
    tags = subprocess.run(["git", "-C", str(repo), "tag"], capture_output=True, text=True, check=True).stdout.split()
    out = {}
    for tag in sorted(tags, key=lambda t: _tag_version(t) or ()):
        v = _tag_version(tag)
        if v is None or not FIRST <= v[:2] <= LAST:
            continue
        src = subprocess.run(["git", "-C", str(repo), "show", f"{tag}:samples/common/sampleOptions.cpp"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        flags: set[str] = set()
        for m in HELP_LINE.finditer(src):
            flags.add(m.group(1))
            flags.update(a.strip() for a in m.group(2).split(",") if a.strip())
        out[tag.lstrip("v")] = {"tag": tag, "flags": sorted(flags)}
    return out


def polygraphy_run_flags() -> dict:
    import polygraphy
    from polygraphy.tools.registry import TOOL_REGISTRY

    tool = next(t for t in TOOL_REGISTRY if t.name == "run")
    parser = argparse.ArgumentParser()
    tool.setup_parser(parser.add_subparsers())
    run = parser._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    flags = sorted({o for a in run._actions for o in a.option_strings})
    return {"version": polygraphy.__version__, "flags": flags}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensorrt-repo", type=Path, required=True, help="a clone of github.com/NVIDIA/TensorRT with tags")
    default = Path(__file__).resolve().parents[1] / "qatsparse/export/tool_flags.json"
    ap.add_argument("--out", type=Path, default=default)
    args = ap.parse_args()
    data = {
        "generated_by": "scripts/tool_flags.py",
        "trtexec": {
            "source": "NVIDIA/TensorRT samples/common/sampleOptions.cpp, help text, at each release tag",
            "versions": trtexec_flags(args.tensorrt_repo),
        },
        "polygraphy_run": {
            "source": "the argparse parser of `polygraphy run` (what `polygraphy run --help` lists)",
            **polygraphy_run_flags(),
        },
    }
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    releases = list(data["trtexec"]["versions"])
    print(f"wrote {args.out}: trtexec {releases}, polygraphy {data['polygraphy_run']['version']}")


if __name__ == "__main__":
    main()
