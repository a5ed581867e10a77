"""A module imported at its first use: the CLI registers every command's
parser at start, and most commands need none of the heavy imports
(pyroute2) of the others."""

from __future__ import annotations

import importlib
import types


class _Lazy(types.ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_real"] = None

    def __getattr__(self, attr: str):
        real = self.__dict__["_real"]
        if real is None:
            real = self.__dict__["_real"] = importlib.import_module(self.__name__)
        return getattr(real, attr)


def lazy_module(name: str) -> types.ModuleType:
    """A stand-in for module `name` that imports it when an attribute is read."""
    return _Lazy(name)
