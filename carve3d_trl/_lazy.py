"""Lazy package namespaces (PEP 562): a public name's module is imported on first access, so importing a light
sub-package (e.g. `carve3d_trl.rewards`) does not load TRL, diffusers or accelerate."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_namespace(package: str, exports: dict[str, list[str]]) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """`__getattr__` and `__dir__` for `package` whose public names live in submodules (`{module: [names]}`)."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted([*importlib.import_module(package).__dict__, *where])

    return __getattr__, __dir__
