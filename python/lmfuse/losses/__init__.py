"""Vocabulary losses on Hugging Face causal LMs that never build the ``[B, T, V]`` logits.

```python
from lmfuse.losses import causal_lm_loss, fused_causal_lm, sequence_log_probs

loss = causal_lm_loss(model, input_ids, labels, attention_mask)      # == model(..., labels=labels).loss
lp = sequence_log_probs(model, input_ids, attention_mask, completion_mask)   # .logp_sum [B], .n_tokens [B]
fused_causal_lm(model)                    # a stock transformers.Trainer now trains on the fused loss
```

They run the model's backbone and call :func:`lmfuse.ops.linear_cross_entropy` /
:func:`lmfuse.ops.linear_log_probs` with the model's own output head (weight, bias, logit scale,
final-logit softcap). See ``docs/losses.md``.
"""

from ._head import OutputHead, output_head, run_backbone
from .causal_lm import SequenceLogProbs, causal_lm_loss, sequence_log_probs, shifted_loss
from .trainer import FusedCausalLM, fused_causal_lm

__all__ = [
    "causal_lm_loss", "sequence_log_probs", "SequenceLogProbs", "fused_causal_lm", "FusedCausalLM",
    "OutputHead", "output_head", "run_backbone", "shifted_loss",
]
