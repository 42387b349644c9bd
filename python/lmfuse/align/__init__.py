"""Alignment: preference optimisation (the DPO family), IFT, reward models, UltraMedical data and
medical multiple-choice evaluation. Every log-prob is computed through the fused vocabulary
kernels (:func:`lmfuse.ops.linear_log_probs`, :func:`lmfuse.losses.sequence_log_probs`).

Names are imported from their submodules on first use, so ``import lmfuse.align`` stays light.
"""

import importlib

# public name -> submodule of lmfuse.align that defines it
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
