"""The three top-level packages ship side by side; a user's own ``transforms.py`` or
``samplers.py`` beside a training script must not stand in for ours unnoticed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SIBLINGS = ("samplers", "transforms")
ROOT = Path(__file__).resolve().parent.parent


def _origin(name: str) -> str | None:
    """Where ``import name`` resolves now: a loaded module's file, else the finder's."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__file__", None)
    spec = importlib.util.find_spec(name)
    return None if spec is None else spec.origin


def check_siblings() -> None:
    """Raise ``ImportError`` naming the file when ``samplers`` or ``transforms`` resolves to
    anything but the package installed beside ``bucketing``."""
    for name in SIBLINGS:
        origin = _origin(name)
        expected = ROOT / name / "__init__.py"
        if origin is None or Path(origin).resolve() != expected:
            found = "nothing" if origin is None else repr(origin)
            raise ImportError(
                f"aspect-bucketing needs its own '{name}' package ({expected}), but "
                f"'import {name}' finds {found}. A module of yours named '{name}' shadows it: "
                f"rename that file (e.g. to 'my_{name}.py') or run from another folder."
            )
