"""ECDDP's masked global crops use the shared block masks of :mod:`evforge.models.masking` (re-exported here)."""

from __future__ import annotations

from ...models.masking import LEGACY_NUM_TOKENS, BlockMaskGenerator

__all__ = ["BlockMaskGenerator", "LEGACY_NUM_TOKENS"]
