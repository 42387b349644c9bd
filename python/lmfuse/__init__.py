"""lmfuse: fused GPU kernels (Triton, CUDA C++) for training, adapting and decoding LMs.

``import lmfuse`` is cheap and side-effect free: it registers lmfuse's own ``torch.library``
ops, but initialises no CUDA context, compiles nothing, imports no Triton kernel, no
``transformers`` and patches no other library. Every other layer is a subpackage imported on
first use, so ``import lmfuse; lmfuse.delta`` works as well as ``from lmfuse import delta``:

* :mod:`lmfuse.ops`      functional ops (``low_rank_linear``, ``gated_lora_linear``,
                         ``spec_verify``, ``collab_decode_step``, ...), with backend choice
* :mod:`lmfuse.modules`  drop-in ``nn.Module`` layers (``LoRALinear``, ...)
* :mod:`lmfuse.lpa`      low-dimensional projected attention: model conversion
* :mod:`lmfuse.delta`    delta tuning on ``transformers`` models: LoRA, SoRA, adapters, BitFit,
                         soft prompts; attach / detach / merge / freeze / save / load
* :mod:`lmfuse.sora`     SoRA: the sparse-gate optimizer, schedules, ``SoRATrainer``, pruning,
                         export to PEFT
* :mod:`lmfuse.collab`   decode-time collaboration: speculative, contrastive and proxy decoding
* :mod:`lmfuse.losses`   vocabulary losses that never build the full logits
* :mod:`lmfuse.fusion`, :mod:`lmfuse.align`, :mod:`lmfuse.proteus`  the further layers, when
                         installed in this version (``AttributeError`` otherwise)
* :mod:`lmfuse.models`   the bundled offline model (SmolLM2-135M-Instruct)
* :mod:`lmfuse.bench`    the benchmark harness (``lmfuse bench``)
* :mod:`lmfuse.testing`  test utilities (tolerances, references)
"""

import importlib
import importlib.util

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401  (registers the torch.library ops; light)

# the layers imported on first attribute access (they pull in transformers, Triton, ...)
LAYERS = ("modules", "lpa", "delta", "sora", "collab", "losses", "fusion", "align", "proteus",
          "models", "bench", "testing")



def _available(name: str) -> bool:
    return importlib.util.find_spec(f"{__name__}.{name}") is not None


__all__ = ["ops", "__version__", *(n for n in LAYERS if _available(n))]


def __getattr__(name):
    if name in LAYERS and _available(name):
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'lmfuse' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {n for n in LAYERS if _available(n)})
