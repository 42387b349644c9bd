"""Language-model backends for PROTEUS planning: an OpenAI-compatible HTTP endpoint, a local
Hugging Face model with constrained decoding, and a replay backend. All share
:class:`LLMBackend`; :func:`ask_json` asks for a schema-valid JSON reply."""

from .backend import LLMBackend, LLMError, ask_json, parse_json_reply, validate_json
from .openai_compat import OpenAICompatBackend
from .replay import ReplayBackend


def make_backend(spec, **options):
    """A backend from a short spec: ``None``/``"none"`` → None (no LLM), ``"local"`` → the bundled
    model (:class:`LocalHFBackend`), an ``http(s)://`` URL → :class:`OpenAICompatBackend`; a
    backend object is returned as it is."""
    if spec is None or spec == "none":
        return None
    if isinstance(spec, str):
        if spec == "local":
            from .local_hf import LocalHFBackend

            return LocalHFBackend(**options)
        if spec.startswith(("http://", "https://")):
            return OpenAICompatBackend(spec, **options)
        raise ValueError(f"llm must be 'none', 'local' or an http(s):// URL, got {spec!r}")
    if hasattr(spec, "chat"):
        return spec
    raise TypeError(f"llm must be a str or a backend with .chat(), got {type(spec).__name__}")


def __getattr__(name):
    if name == "LocalHFBackend":  # imports torch lazily
        from .local_hf import LocalHFBackend

        return LocalHFBackend
    raise AttributeError(name)


__all__ = ["LLMBackend", "LLMError", "ask_json", "parse_json_reply", "validate_json", "OpenAICompatBackend",
           "ReplayBackend", "LocalHFBackend", "make_backend"]
