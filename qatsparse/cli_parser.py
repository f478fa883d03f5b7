"""The ``qatsparse`` command's argument parser: jsonargparse's errors about unknown keys completed with the
valid keys there and the closest one."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Sequence
from typing import Any

from pytorch_lightning.cli import LightningArgumentParser


def _accepted_args(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls.__init__).parameters.values()
    except Exception:
        return []
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _hint(bad: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(bad, valid, n=1)
    maybe = f" (did you mean {close[0]!r}?)" if close else ""
    return f"'{bad}' is not a valid key{maybe}; valid keys: {', '.join(valid)}"


def error_hints(message: str, parser_keys: Sequence[str] = ()) -> list[str]:
    """For each unknown key named in a jsonargparse error: the valid keys there and the closest one.

    Jsonargparse names the unknown key but not the accepted ones; users of recipes need both.

    Example:
        >>> msg = "Problem with given class_path 'qatsparse.TwoFourSparsity':\\n  Option 'start_stp' is not accepted"
        >>> "did you mean 'start_step'?" in error_hints(msg)[0]
        True
    """
    hints = []
    for cls, bad in re.findall(r"class_path '([\w.]+)':\s*\n\s*Option '([\w.]+)' is not accepted", message):
        hints.append(f"{cls}: {_hint(bad, _accepted_args(cls))}")
    unknown = re.findall(r"does not accept option '([\w.]+)'", message)
    unknown += re.findall(r"unrecognized arguments: --([\w.]+)", message)
    if not hints:
        unknown += re.findall(r"^Option '([\w.]+)' is not accepted", message, flags=re.M)
    for key in unknown:
        prefix = key.rpartition(".")[0]
        valid = [k[len(prefix) + 1 :] if prefix else k for k in parser_keys if k.rpartition(".")[0] == prefix]
        if valid:
            hints.append(f"{prefix or 'top level'}: {_hint(key.rpartition('.')[2], sorted(set(valid)))}")
    return hints


class QatsparseArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors about unknown keys also list the valid keys.

    Example:
        >>> p = QatsparseArgumentParser(exit_on_error=False); _ = p.add_argument("--max_steps", type=int)
        >>> try:
        ...     p.parse_args(["--max_stesp=3"])
        ... except Exception as e:
        ...     print("did you mean 'max_steps'?" in str(e))
        True
    """

    def error(self, message: str, ex: Exception | None = None) -> Any:
        parser = getattr(ex, "subcommand_parser", None) or self
        keys = [a.dest for a in getattr(parser, "_actions", [])]
        hints = error_hints(message, keys)
        if hints:
            message = message.rstrip() + "\n" + "\n".join(f"  hint: {h}" for h in hints)
        return super().error(message, ex)
