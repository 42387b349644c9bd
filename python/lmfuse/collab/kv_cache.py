"""Per-row KV-cache bookkeeping for batched decoding with Hugging Face causal LMs.

A batch decoded with speculative sampling accepts a different number of draft tokens in each
row, so each row's cache must be rolled back by its own amount. ``DynamicCache`` stores one
rectangular ``[B, heads, T, head_dim]`` tensor per layer and can only crop every row at once.

The choice made here ("holes + compaction"): the cache stays rectangular, and a boolean
``valid [B, T]`` mask says which physical slots belong to each row's sequence. Rolling a row
back marks its rejected slots invalid; they are passed to the model as ``attention_mask == 0``
so no later query attends to them, and every new token gets an explicit ``position_ids`` equal
to the number of valid tokens before it, so rotary positions are those of the compact
sequence. Keys are rotated when they are written, so where a key sits physically never matters,
only whether it is masked. Trailing slots invalid in every row are cropped at once (cheap), and
when the wasted slots exceed ``compact_threshold`` the cache is compacted by one gather per
layer that right-aligns each row's valid slots (left padding again).

Masked slots contribute exactly zero to attention, so the result equals that of a cache that
holds exactly each row's accepted tokens, up to floating-point summation order.
"""

from __future__ import annotations

import torch


def _cache_layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"expected a transformers Cache with .layers, got {type(cache).__name__}")
    return layers


class DecodeState:
    """One model's KV cache for a batch, with per-row validity and positions.

    ``valid [B, T]`` bool marks the slots that belong to each row; ``next_pos [B]`` is the
    position id the row's next token gets (its count of valid tokens).
    """

    def __init__(self, model, batch_size: int, device, compact_threshold: int = 32):
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.compact_threshold = int(compact_threshold)
        self.calls = 0

    @property
    def length(self) -> int:
        """Physical cache length (valid and invalid slots)."""
        return self.valid.shape[1]

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor, valid: torch.Tensor | None = None, keep: int = 0) -> torch.Tensor:
        """Run the model on ``tokens [B, w]`` after the cached prefix and append them to the cache.

        ``valid [B, w]`` (default all True) marks real tokens; invalid ones (padding) are
        cached but masked. Returns float32 logits of the last ``keep`` positions (all when 0),
        ``[B, keep or w, V]``.
        """
        if tokens.shape[1] == 0:
            raise ValueError("DecodeState.feed: tokens must have at least one column")
        if valid is None:
            valid = torch.ones_like(tokens, dtype=torch.bool)
        # Each real token sits at its row's count of real tokens so far; padding slots reuse
        # the previous position (never attended to, so any finite value would do).
        pos = self.next_pos[:, None] + torch.cumsum(valid.long(), dim=1) - 1
        pos = pos.clamp_min(0)
        mask = torch.cat([self.valid, valid], dim=1)
        out = self.model(input_ids=tokens, attention_mask=mask.long(), position_ids=pos,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        self.calls += 1
        self.valid = mask
        self.next_pos = self.next_pos + valid.long().sum(dim=1)
        return out.logits.float()

    def drop_last(self, n: torch.Tensor) -> None:
        """Roll row ``b`` back by its last ``n[b]`` slots (which must all be valid).

        This is the per-row rollback: afterwards each row's valid slots are exactly its kept
        tokens. Slots invalid in every row at the end are cropped; the cache is compacted when
        the waste reaches ``compact_threshold``.
        """
        n = n.to(device=self.valid.device, dtype=torch.long)
        T = self.length
        if bool((n < 0).any()) or bool((n > T).any()):
            raise ValueError(f"drop_last: counts must lie in [0, {T}], got {n.tolist()}")
        cols = torch.arange(T, device=self.valid.device)
        drop = cols[None, :] >= (T - n)[:, None]
        if bool((drop & ~self.valid).any()):
            raise ValueError("drop_last: a dropped slot was not valid (rollback past padding)")
        self.valid = self.valid & ~drop
        self.next_pos = self.next_pos - n
        self._crop_trailing()
        if self.length - int(self.valid.sum(dim=1).max()) >= self.compact_threshold:
            self.compact()

    def _crop_trailing(self) -> None:
        any_valid = self.valid.any(dim=0)
        nz = torch.nonzero(any_valid)
        keep = int(nz[-1]) + 1 if nz.numel() else 0
        remove = self.length - keep
        if remove > 0:
            self.cache.crop(-remove)
            self.valid = self.valid[:, :keep]

    def compact(self) -> None:
        """Right-align each row's valid slots in a cache as long as the longest row (one gather
        per layer); the freed slots become left padding."""
        T = self.length
        counts = self.valid.sum(dim=1)
        L = int(counts.max()) if counts.numel() else 0
        if L == T:
            return
        # A stable sort of the validity flags keeps the order of valid slots and puts the
        # invalid ones first; the last L indices are the row's valid slots, left-padded.
        idx = torch.sort(self.valid.to(torch.int8), dim=1, stable=True).indices[:, T - L:]
        for layer in _cache_layers(self.cache):
            if not getattr(layer, "is_initialized", False):
                continue
            if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
                raise NotImplementedError(
                    f"compaction supports full-attention DynamicLayer caches, got {type(layer).__name__}")
            # slots in front of the batch's own (a prefix-tuning delta's keys/values) stay first
            head = layer.keys.shape[2] - T
            k, v = layer.keys[:, :, head:], layer.values[:, :, head:]
            g = idx[:, None, :, None].expand(k.shape[0], k.shape[1], L, k.shape[3])
            layer.keys = torch.cat([layer.keys[:, :, :head], k.gather(2, g)], dim=2)
            layer.values = torch.cat([layer.values[:, :, :head],
                                      v.gather(2, idx[:, None, :, None].expand(v.shape[0], v.shape[1], L, v.shape[3]))], dim=2)
        self.valid = self.valid.gather(1, idx)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the batch (rows that finished are dropped)."""
        rows = rows.to(self.valid.device)
        if self.length > 0:
            self.cache.batch_select_indices(rows)
        self.valid = self.valid[rows]
        self.next_pos = self.next_pos[rows]
        self._crop_trailing()


def left_padded(seqs: list[torch.Tensor], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D token tensors into ``[B, max_len]`` with left padding; returns (tokens, valid)."""
    width = max((int(s.numel()) for s in seqs), default=0)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool, device=device)
    for i, s in enumerate(seqs):
        if s.numel():
            tokens[i, width - s.numel():] = s
            valid[i, width - s.numel():] = True
    return tokens, valid
