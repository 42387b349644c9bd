"""Reference log-probs computed once and kept on disk, keyed by the data and the reference weights.

The key is two SHA-256 digests: one of the tokenised examples (with the truncation settings that
change what is scored), one of the reference model's tensors (names, dtypes, shapes and bytes of
every parameter and buffer the forward uses). Changing either gives another file: a stale cache is
never read.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import torch
from torch import nn

__all__ = ["data_fingerprint", "weights_fingerprint", "cache_path", "load_cached", "save_cached"]

_FORMAT = 1


def data_fingerprint(examples: list[dict], *, max_length: int | None, truncation_mode: str,
                     ld_alpha: float | None = None) -> str:
    """SHA-256 of the tokenised examples (``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``) in order,
    and of the settings that change their scores (truncation, LD-DPO's ``ld_alpha``)."""
    head = f"lmfuse-pref-data/{_FORMAT}/{max_length}/{truncation_mode}/{len(examples)}"
    if ld_alpha is not None:
        head += f"/ld_alpha={float(ld_alpha)!r}"
    h = hashlib.sha256(head.encode())
    for ex in examples:
        for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
            ids = torch.tensor(ex[k], dtype=torch.int64)
            h.update(f"{k}:{ids.numel()};".encode())
            h.update(ids.numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``model`` (by name, dtype, shape and value)."""
    h = hashlib.sha256(f"lmfuse-pref-weights/{_FORMAT}".encode())
    seen = set()
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.data_ptr() in seen:  # a tied weight: its name is hashed, its bytes once
            continue
        seen.add(t.data_ptr())
        flat = t.detach().contiguous().view(-1).cpu()
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def cache_path(cache_dir: str, data_key: str, weights_key: str) -> str:
    return os.path.join(cache_dir, f"ref_logps-{data_key[:20]}-{weights_key[:20]}.pt")


def load_cached(path: str, n: int, data_key: str, weights_key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached ``(chosen [n], rejected [n])`` float32 log-probs, or None when absent or not ours."""
    if not os.path.exists(path):
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if (blob.get("format") != _FORMAT or blob.get("data") != data_key or blob.get("weights") != weights_key
            or blob["chosen"].shape != (n,) or blob["rejected"].shape != (n,)):
        return None
    return blob["chosen"], blob["rejected"]


def save_cached(path: str, chosen: torch.Tensor, rejected: torch.Tensor, data_key: str, weights_key: str) -> None:
    """Write atomically (a temporary file renamed into place), so a reader never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    blob = {"format": _FORMAT, "data": data_key, "weights": weights_key,
            "chosen": chosen.detach().float().cpu(), "rejected": rejected.detach().float().cpu()}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
