"""Module `__getattr__` for packages whose public names are imported on first use (PEP 562), so that importing a
light part of a package does not pull in torch, transformers or datasets through its `__init__`."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_getattr(package: str, public_names: dict[str, str],
                 before_import: Callable[[], None] | None = None) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports `name` from its submodule `public_names[name]` on first
    access (calling `before_import()` first, when given)."""

    def __getattr__(name: str) -> Any:
        if name not in public_names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if before_import is not None:
            before_import()
        return getattr(importlib.import_module(f".{public_names[name]}", package), name)

    return __getattr__
