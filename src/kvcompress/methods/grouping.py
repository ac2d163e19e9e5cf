"""Slots that a group of KV heads stores once: per-head validity over a per-group inner store.

``lowrank`` (one latent per head group and token) and ``share_heads`` (one K/V per head group and
token) both hold ``(B, G, N, .)`` tensors in an inner store while the layer sees ``H`` heads. A slot
lives while any head of its group keeps it; each head's own validity is tracked here.

Shapes: ``B`` batch, ``H`` KV heads, ``G`` groups, ``N`` slots.
"""

from __future__ import annotations

import torch

from kvcompress.protocols import Store


class GroupedSlots:
    """Per-head validity of slots shared by head groups, and the inner store's compaction.

    Args:
        group_of: ``(H,)`` long, the group of each head.
        groups: ``G``.
    """

    STATE = ("valid",)  # see kvcompress.state

    def __init__(self, group_of: torch.Tensor, groups: int):
        self.group_of, self.groups = group_of, groups
        self.valid: torch.Tensor | None = None  # (B, H, N) bool, None: all valid

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.group_of, self.valid) if t is not None)

    def any_in_group(self, per_head: torch.Tensor) -> torch.Tensor:
        """``(B, H, n)`` bool -> ``(B, G, n)``: True where some head of the group is True."""
        batch, _, n = per_head.shape
        counts = torch.zeros(batch, self.groups, n, dtype=torch.int32, device=per_head.device)
        return counts.index_add_(1, self.group_of.to(per_head.device), per_head.to(torch.int32)) > 0

    def append(self, valid: torch.Tensor | None, batch: int, heads: int, old: int, n: int, device) -> torch.Tensor | None:
        """Record ``(B, H, n)`` validity of new slots; return the ``(B, G, n)`` one for the inner store."""
        if valid is not None and not bool(valid.all()):
            if self.valid is None:
                self.valid = torch.ones(batch, heads, old, dtype=torch.bool, device=device)
            self.valid = torch.cat([self.valid, valid], -1)
            return self.any_in_group(valid)
        if self.valid is not None:
            self.valid = torch.cat([self.valid, self.valid.new_ones(batch, heads, n)], -1)
        return None

    def compact(self, inner: Store, keep: torch.Tensor) -> torch.Tensor:
        """Compact ``inner`` to the slots some head of each group keeps; return ``(B, H, n)`` old slots."""
        index = inner.compact(self.any_in_group(keep))[:, self.group_of.to(keep.device)]  # (B, H, n)
        valid = keep.gather(-1, index)
        self.valid = None if bool(valid.all()) else valid
        return index

    def map_batch(self, fn) -> None:
        if self.valid is not None:
            self.valid = fn(self.valid)
