"""Method registry: name -> :class:`~promptcl.methods.base.PromptMethod` subclass.

Built-in methods are imported on first lookup; one method failing to import does not break the
others (the error is raised when that method is asked for).
"""

from __future__ import annotations

import importlib

from promptcl.methods.base import MethodEntry, PromptMethod

BUILTIN_MODULES = tuple(f"promptcl.methods.{name}" for name in (
    "smope", "hide", "norga", "l2p", "dualprompt", "sprompt", "coda", "ovor", "vqprompt", "simplecil", "oneprompt"))

METHODS: dict[str, MethodEntry] = {}
_loaded = False


def register_method(name: str):
    def wrap(cls: type[PromptMethod]) -> type[PromptMethod]:
        if not issubclass(cls, PromptMethod):
            raise TypeError(f"{cls.__name__} must subclass PromptMethod")
        if name in METHODS and METHODS[name].cls is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        cls.NAME = name
        METHODS[name] = MethodEntry(cls=cls)
        return cls

    return wrap


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except Exception as err:  # kept and raised when the method is requested
            METHODS.setdefault(module.rsplit(".", 1)[-1], MethodEntry(import_error=err))


def method_names() -> list[str]:
    _load_builtin()
    return sorted(METHODS)


def get_method(name: str) -> type[PromptMethod]:
    _load_builtin()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    entry = METHODS[name]
    if entry.cls is None:
        raise ImportError(f"method {name!r} failed to import: {entry.import_error}") from entry.import_error
    return entry.cls
