"""Functional ops of lmfuse.

Every op validates its inputs (clear ``TypeError``/``ValueError`` naming the argument), has a
plain-PyTorch reference (``<op>_reference``), is registered with ``torch.library`` (fake
implementation included, so ``torch.compile`` traces it without graph breaks), is
differentiable where that makes sense, and picks a backend per call (see
:func:`available_backends`, :func:`use_backend` and the ``LMFUSE_BACKEND`` variable).
"""

from .._backend import (BACKENDS, BackendStatus, BackendUnavailableError, available_backends,
                        use_backend)
from .low_rank_linear import MAX_FUSED_RANK, low_rank_linear
from .low_rank_linear import cost as low_rank_linear_cost
from .low_rank_linear import reference as low_rank_linear_reference
from .gated_lora import cost as gated_lora_linear_cost
from .gated_lora import gated_lora_linear, lora_linear
from .gated_lora import reference as gated_lora_linear_reference
from .lpa_qkv import cost as lpa_qkv_projection_cost
from .lpa_qkv import lpa_qkv_projection
from .lpa_qkv import reference as lpa_qkv_projection_reference
from .spec_verify import SpecVerifyResult, spec_verify
from .spec_verify import cost as spec_verify_cost
from .spec_verify import reference as spec_verify_reference
from .collab_logits import (DecodeStepResult, collab_decode_step, collab_decode_step_reference,
                            contrastive_logits, contrastive_logits_reference, proxy_logits,
                            proxy_logits_reference)
from .linear_cross_entropy import cost as linear_cross_entropy_cost
from .linear_cross_entropy import linear_cross_entropy, linear_log_probs
from .linear_cross_entropy import log_probs_reference as linear_log_probs_reference
from .linear_cross_entropy import reference as linear_cross_entropy_reference
from .expert_blend import BlendDecodeResult, expert_blend_cross_entropy, expert_blend_decode_step
from .expert_blend import blend_logits as expert_blend_logits
from .expert_blend import reference as expert_blend_cross_entropy_reference
from .discounted_cumsum import cost as discounted_cumsum_cost, discounted_cumsum, reference as discounted_cumsum_reference

__all__ = [
    "BACKENDS", "BackendStatus", "BackendUnavailableError", "available_backends", "use_backend",
    "MAX_FUSED_RANK",
    "low_rank_linear", "low_rank_linear_reference", "low_rank_linear_cost",
    "lpa_qkv_projection", "lpa_qkv_projection_reference", "lpa_qkv_projection_cost",
    "gated_lora_linear", "lora_linear", "gated_lora_linear_reference", "gated_lora_linear_cost",
    "spec_verify", "SpecVerifyResult", "spec_verify_reference", "spec_verify_cost",
    "contrastive_logits", "contrastive_logits_reference", "proxy_logits", "proxy_logits_reference",
    "collab_decode_step", "collab_decode_step_reference", "DecodeStepResult",
    "linear_cross_entropy", "linear_log_probs", "linear_cross_entropy_reference",
    "linear_log_probs_reference", "linear_cross_entropy_cost",
]
__all__ += ["expert_blend_cross_entropy", "expert_blend_cross_entropy_reference", "expert_blend_decode_step",
            "expert_blend_logits", "BlendDecodeResult"]
