"""Module-name patterns of the ``include``/``exclude`` arguments: regular expressions or shell globs.

A pattern is a regular expression searched anywhere in a module's name (``re.search``): ``"fc"``
matches ``fc`` and ``head.fc``, ``"^layer4\\."`` every module under ``layer4``. Patterns written the
ModelOpt way, as shell globs matched against the whole name (``"*head*"``, ``"*.downsample.*"``), are
not valid regexes; such a pattern (invalid as a regex, containing ``*`` or ``?``) is read as a glob
(``fnmatch``). ``"glob:PATTERN"`` forces the glob reading of a pattern that is also a valid regex
(``"glob:layer?.conv1"``). Anything else that is not a valid regex is an error naming the argument,
the pattern and both forms.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

#: Prefix that forces the glob reading of a pattern.
GLOB_PREFIX = "glob:"


@dataclass(frozen=True)
class NamePattern:
    """One compiled pattern: what the user wrote, how it is read, and the regex that implements it.

    Example:
        >>> p = compile_pattern("*head*"); p.kind, p.matches("model.head.fc"), p.matches("body")
        ('glob', True, False)
    """

    text: str
    kind: Literal["regex", "glob"]
    regex: re.Pattern[str]

    def matches(self, name: str) -> bool:
        """Whether module ``name`` matches (regexes: anywhere in the name; globs: the whole name)."""
        if self.kind == "glob":
            return self.regex.match(name) is not None
        return self.regex.search(name) is not None


def _glob(text: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(text))


@functools.lru_cache(maxsize=1024)
def compile_pattern(text: str, argument: str = "pattern") -> NamePattern:
    """Read one pattern (see the module docstring); ``argument`` names it in errors.

    Raises:
        ValueError: ``text`` is not a string, or neither a valid regex nor a glob.

    Example:
        >>> compile_pattern("fc").kind, compile_pattern("glob:layer?.conv1").matches("layer1.conv1")
        ('regex', True)
    """
    if not isinstance(text, str):
        raise ValueError(f"{argument}: patterns are strings (regexes or globs), got {text!r}")
    if text.startswith(GLOB_PREFIX):
        return NamePattern(text, "glob", _glob(text[len(GLOB_PREFIX) :]))
    try:
        return NamePattern(text, "regex", re.compile(text))
    except re.error as e:
        if "*" in text or "?" in text:
            return NamePattern(text, "glob", _glob(text))
        raise ValueError(
            f"{argument}: pattern {text!r} is not a valid regular expression ({e}). Patterns are regexes "
            "searched in module names (e.g. 'fc', r'^layer4\\.') or shell globs matched against the whole name "
            "(e.g. '*head*', 'glob:layer?.conv1')"
        ) from None


def compile_patterns(patterns: str | Iterable[str] | None, argument: str = "pattern") -> list[NamePattern]:
    """Read a pattern list (one string counts as a list of one; None as empty)."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    return [compile_pattern(p, argument) for p in patterns]


def matches_any(patterns: Sequence[NamePattern], name: str) -> bool:
    """Whether ``name`` matches one of ``patterns``."""
    return any(p.matches(name) for p in patterns)


def require_matches(patterns: Sequence[NamePattern], names: Iterable[str], argument: str, what: str) -> None:
    """Fail when a pattern matches none of ``names`` (a misspelt ``exclude`` must not silently exclude
    nothing).

    Raises:
        ValueError: naming the argument, the pattern and the names there are.

    Example:
        >>> require_matches(compile_patterns(["fc"]), ["conv", "fc"], "exclude", "layer")
        >>> require_matches(compile_patterns(["head"]), ["conv", "fc"], "exclude", "layer")
        Traceback (most recent call last):
        ...
        ValueError: exclude: pattern 'head' matches no layer; the layers are ['conv', 'fc']
    """
    names = sorted(set(names))
    for p in patterns:
        if not any(p.matches(n) for n in names):
            shown = names if len(names) <= 40 else [*names[:40], f"... ({len(names) - 40} more)"]
            raise ValueError(f"{argument}: pattern {p.text!r} matches no {what}; the {what}s are {shown}")
