"""PROTEUS: automated proteomics discovery — data readers, analysis tools, planning (rules, an
LLM, or both), execution with refinement, grounded hypotheses, reports and evaluation. Works
offline by default.

Names are imported from their submodules on first use, so ``import lmfuse.proteus`` stays light.
"""

import importlib

# public name -> submodule of lmfuse.proteus that defines it
_EXPORTS: dict[str, str] = {
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
