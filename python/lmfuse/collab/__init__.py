"""Decode-time collaboration of language models (FS-GEN): speculative decoding, contrastive
decoding, proxy tuning, and the analysis of when a small model needs a large one.

Generation (Hugging Face causal LMs, batched, left-padded prompts, per-row EOS):

``speculative_generate``   draft model or prompt lookup + ``lmfuse.ops.spec_verify``
``contrastive_generate``   ``lmfuse.ops.collab_decode_step(mode="contrastive")``
``proxy_generate``         ``lmfuse.ops.collab_decode_step(mode="proxy")``
``plain_generate``         one model through the same loop
``oracle_trace``           the large model decodes; records where the small model disagrees

Drafters: ``PromptLookupDrafter``, ``truncate_layers`` (a self-draft sharing the target's weights).
Analysis: ``lmfuse.collab.analysis`` (routers, collaboration frequency, scaling fit, plots).
"""

from .contrastive import (CollabStats, TokenTrace, contrastive_generate, oracle_trace, plain_generate,
                          proxy_generate)
from .drafters import PromptLookupDrafter, truncate_layers
from .kv_cache import DecodeState
from .speculative import GenerateOutput, SpeculativeStats, speculative_generate

__all__ = [
    "speculative_generate", "contrastive_generate", "proxy_generate", "plain_generate", "oracle_trace",
    "GenerateOutput", "SpeculativeStats", "CollabStats", "TokenTrace",
    "PromptLookupDrafter", "truncate_layers", "DecodeState",
]
