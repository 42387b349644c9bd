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
from .lpa_qkv import cost as lpa_qkv_projection_cost
from .lpa_qkv import lpa_qkv_projection
from .lpa_qkv import reference as lpa_qkv_projection_reference

__all__ = [
    "BACKENDS", "BackendStatus", "BackendUnavailableError", "available_backends", "use_backend",
    "MAX_FUSED_RANK",
    "low_rank_linear", "low_rank_linear_reference", "low_rank_linear_cost",
    "lpa_qkv_projection", "lpa_qkv_projection_reference", "lpa_qkv_projection_cost",
]
