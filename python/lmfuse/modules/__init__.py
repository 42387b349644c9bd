"""Drop-in ``nn.Module`` layers built on :mod:`lmfuse.ops`."""

from .low_rank_linear import LowRankLinear
from .lora import LoRALinear
from .lpa_qkv import FusedQKVGroup, QKVLowRankLinear
from .token_gate import TokenGate

__all__ = ["LowRankLinear", "LoRALinear", "QKVLowRankLinear", "FusedQKVGroup", "TokenGate"]
