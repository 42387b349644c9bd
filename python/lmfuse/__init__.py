"""lmfuse: fused GPU kernels (Triton, CUDA C++) for training, adapting and decoding LMs.

``import lmfuse`` is cheap and side-effect free: it registers lmfuse's own ``torch.library``
ops, but initialises no CUDA context, compiles nothing, imports no Triton kernel and patches no
other library. Submodules:

* :mod:`lmfuse.ops`      functional ops (``low_rank_linear``, ``lpa_qkv_projection``, ...)
* :mod:`lmfuse.modules`  drop-in ``nn.Module`` layers
* :mod:`lmfuse.lpa`      low-dimensional projected attention: model conversion
* :mod:`lmfuse.bench`    the benchmark harness (``lmfuse bench``)
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401  (registers the torch.library ops; light)

__all__ = ["ops", "__version__"]


def __getattr__(name):  # lazy submodules: importing lmfuse does not pull transformers etc.
    import importlib

    if name in ("modules", "lpa", "bench", "testing"):
        return importlib.import_module(f"lmfuse.{name}")
    raise AttributeError(f"module 'lmfuse' has no attribute {name!r}")
