"""The shipped recipes: where they are, their names and descriptions, ``--config`` values resolved to paths,
and the recipe format's ``version:`` key."""

from __future__ import annotations

import re
from argparse import ArgumentTypeError
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Folder of the shipped recipes (package data; ``recipes/`` at the repository root mirrors it).
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
#: Recipe format versions this release reads (the ``version:`` key of a recipe).
RECIPE_VERSIONS = (1,)


# ---------------------------------------------------------------------------------------- recipes
def recipe_paths() -> dict[str, Path]:
    """Shipped recipes by name.

    Example:
        >>> "digits_int8_sparse" in recipe_paths()
        True
    """
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_description(path: str | Path) -> str:
    """The one-line description of a recipe: its first comment line, without a leading ``name --``."""
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text:
            return re.sub(rf"^{re.escape(Path(path).stem)}\s*(--|:|-)\s*", "", text)
    return ""


def list_recipes() -> dict[str, str]:
    """``{name: one-line description}`` of the shipped recipes (what ``qatsparse recipes`` prints)."""
    return {name: recipe_description(p) for name, p in recipe_paths().items()}


def resolve_config(value: str) -> str:
    """A ``--config`` value as a path: an existing file is kept, a shipped recipe's name (with or
    without ``.yaml``) becomes its path, anything else is an error naming the shipped recipes.

    Example:
        >>> Path(resolve_config("digits_int8_sparse")).name
        'digits_int8_sparse.yaml'
    """
    if Path(value).exists() or value.lstrip().startswith(("{", "[")) or "\n" in value or ":" in value:
        return value  # a file, or inline YAML/JSON (jsonargparse accepts both)
    recipes = recipe_paths()
    name = value[: -len(".yaml")] if value.endswith(".yaml") else value
    if name in recipes:
        return str(recipes[name])
    raise SystemExit(
        f"error: --config {value!r} is neither a file nor a shipped recipe; shipped recipes: {', '.join(recipes)}"
    )


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """Replace every ``--config``/``-c`` value of a command line with :func:`resolve_config`'s path."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("--config", "-c"):
            out.append(arg)
            value = next(it, None)
            if value is not None:
                out.append(resolve_config(value))
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


class RecipeVersionError(ArgumentTypeError, ValueError):
    """An unsupported ``version:`` (argparse shows an ArgumentTypeError's message, jsonargparse a ValueError's)."""


def recipe_version(value: Any) -> int:
    """Type of the ``version`` key: an integer among :data:`RECIPE_VERSIONS`."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise RecipeVersionError(f"version must be an integer among {list(RECIPE_VERSIONS)}, got {value!r}") from None
    if v not in RECIPE_VERSIONS:
        raise RecipeVersionError(
            f"recipe version {v} is not supported by this qatsparse; supported versions: {list(RECIPE_VERSIONS)}"
        )
    return v


def print_recipes() -> None:
    """Print the shipped recipes, one per line with its description."""
    recipes = list_recipes()
    width = max(map(len, recipes), default=0)
    for name, desc in recipes.items():
        print(f"{name:<{width}}  {desc}")
    print(f"\nRun one with `qatsparse fit --config NAME`; the files are in {RECIPES_DIR}")
