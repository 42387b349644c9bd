"""LPA — low-dimensional projected attention: convert HF models' attention projections to
low-rank ``x·Aᵀ·Bᵀ`` form, trained from scratch (``init="random"``) or from dense weights
(``init="svd"``)."""

from .convert import DEFAULT_TARGETS, convert_to_lpa, fused_qkv_calls, lpa_parameter_count

__all__ = ["convert_to_lpa", "DEFAULT_TARGETS", "lpa_parameter_count", "fused_qkv_calls"]
