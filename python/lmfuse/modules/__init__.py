"""Drop-in ``nn.Module`` layers built on :mod:`lmfuse.ops`."""

from .low_rank_linear import LowRankLinear
from .lpa_qkv import FusedQKVGroup, QKVLowRankLinear

__all__ = ["LowRankLinear", "QKVLowRankLinear", "FusedQKVGroup"]
