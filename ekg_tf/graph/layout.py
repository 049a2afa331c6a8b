"""The channel layout of a tensor: which channel groups its last axis holds, in order.

A layout is a sequence of segments (group, size): a plain feature map holds one
segment; a Concatenate output holds the segments of its inputs one after the
other. `tile` > 1 describes a flattened feature map (Flatten / Reshape before a
Dense): the last axis is `tile` repetitions of the segments (spatial position
major, channel minor), as `reshape([B, H, W, C] -> [B, H*W*C])` lays them out.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Layout:
    segments: tuple          # ((key, size), ...): key is an atom id, then a group name or None
    tile: int = 1

    @property
    def channels(self) -> int:
        return sum(size for _, size in self.segments)

    @property
    def width(self) -> int:
        return self.tile * self.channels

    def keys(self) -> tuple:
        return tuple(key for key, _ in self.segments)

    def map(self, fn) -> "Layout":
        return Layout(tuple((fn(key), size) for key, size in self.segments), self.tile)

    def concat(self, other: "Layout") -> "Layout":
        return Layout(self.segments + other.segments, 1)
