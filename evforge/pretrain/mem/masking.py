"""MEM's patch masks: BEiT block masking (the default) or uniformly random patches.

MEM (``mem/masking_generator.py: MaskingGenerator``, BEiT's) masks every sample with ``num_mask_patches`` of
the ``h x w`` patches (``configs/*.conf``: 98 of 14 x 14 = 50 %): rectangles of ``min_num_patches`` (16,
``--min_mask_patches_per_block``) up to ``max_num_patches`` (default: all ``num_mask_patches``) patches, aspect
ratio log-uniform in [0.3, 1/0.3], each strictly smaller than the grid in both sides, are painted until the
count is reached (a rectangle may not overshoot the remaining budget; 10 failed draws in a row stop early).
That algorithm is :class:`~evforge.models.masking.BlockMaskGenerator`'s (ECDDP took it from iBOT,
which took it from BEiT); :class:`BEiTMaskGenerator` reuses it with a fixed count for every sample.

``masking = random`` (``MaskingGeneratorRandomLocation``) draws ``num_mask_patches`` patches uniformly; MEM's
draws them from ``arange(h*w - 1)`` (``mem/masking_generator.py:109-111``), so it never masks the last patch:
:class:`RandomMaskGenerator` draws from all of them, ``legacy_skip_last=True`` reproduces MEM's.

Both draw with Python's ``random`` from a seed taken off the torch generator, as MEM's generators draw with the
global ``random``: after ``random.seed(s)`` MEM's ``MaskingGenerator()`` returns exactly
``BEiTMaskGenerator.sample(n, random.Random(s))`` (checked against the reference's masks in the tests).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ...models.masking import BlockMaskGenerator


def _seed(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


class BEiTMaskGenerator(BlockMaskGenerator):
    """BEiT/MEM block masks: ``num_masking_patches`` patches of a ``grid`` per sample (fewer only when blocks
    stop fitting). ``__call__(batch_size, generator) -> (B, h*w)`` bool, a function of ``generator``'s state."""

    def __init__(self, grid: tuple[int, int] | int, num_masking_patches: int, *, min_num_patches: int = 16,
                 max_num_patches: int | None = None, aspect: tuple[float, float] = (0.3, 1 / 0.3)):
        h, w = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if not 0 < num_masking_patches < h * w:
            raise ValueError(f"num_masking_patches must be in [1, {h * w - 1}] for a {h}x{w} grid, "
                             f"got {num_masking_patches}")
        if min_num_patches > num_masking_patches:
            raise ValueError(f"min_num_patches {min_num_patches} > num_masking_patches {num_masking_patches}")
        super().__init__((h, w), ratio_range=(num_masking_patches / (h * w),) * 2, min_num_patches=min_num_patches,
                         max_num_patches=num_masking_patches if max_num_patches is None else max_num_patches,
                         aspect=aspect, mask_probability=1.0)
        self.num_masking_patches = int(num_masking_patches)

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        rng = random.Random(_seed(generator))
        masks = [self.sample(self.num_masking_patches, rng) for _ in range(batch_size)]
        if not masks:
            return torch.zeros(0, self.num_patches, dtype=torch.bool)
        return torch.from_numpy(np.stack(masks).reshape(batch_size, -1))


class RandomMaskGenerator:
    """Exactly ``num_masking_patches`` uniformly random patches of a ``grid`` per sample (never the last one
    with ``legacy_skip_last``, as MEM's)."""

    def __init__(self, grid: tuple[int, int] | int, num_masking_patches: int, *, legacy_skip_last: bool = False):
        self.height, self.width = (grid, grid) if isinstance(grid, int) else tuple(grid)
        self.num_patches = self.height * self.width
        self.legacy_skip_last = bool(legacy_skip_last)
        top = self.num_patches - (1 if self.legacy_skip_last else 0)
        if not 0 < num_masking_patches <= top or num_masking_patches >= self.num_patches:
            raise ValueError(f"num_masking_patches must be in [1, {self.num_patches - 1}], got {num_masking_patches}")
        self.num_masking_patches = int(num_masking_patches)

    def sample(self, rng: random.Random) -> np.ndarray:
        """One flat bool mask: MEM's ``random.sample`` of the patch indices (all of them, or all but the last)."""
        top = self.num_patches - (1 if self.legacy_skip_last else 0)
        mask = np.zeros(self.num_patches, dtype=bool)
        mask[rng.sample(range(top), self.num_masking_patches)] = True
        return mask

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        rng = random.Random(_seed(generator))
        if batch_size == 0:
            return torch.zeros(0, self.num_patches, dtype=torch.bool)
        return torch.from_numpy(np.stack([self.sample(rng) for _ in range(batch_size)]))


def make_mask_generator(kind: str, grid: int, *, ratio: float | None = None, num_patches: int | None = None,
                        min_num_patches: int = 16, max_num_patches: int | None = None,
                        legacy_skip_last: bool = False):
    """``kind`` "block" (BEiT) or "random" on a ``grid x grid`` patch grid; the count is ``num_patches`` or
    ``round(ratio * grid**2)`` (MEM: 98 = 0.5 * 196); ``legacy_skip_last``: random masks as MEM's."""
    total = grid * grid
    if num_patches is None:
        if ratio is None:
            raise ValueError("task.mask: give ratio or num_patches")
        num_patches = int(round(float(ratio) * total))
    if kind == "block":
        return BEiTMaskGenerator(grid, num_patches, min_num_patches=min_num_patches, max_num_patches=max_num_patches)
    if kind == "random":
        return RandomMaskGenerator(grid, num_patches, legacy_skip_last=legacy_skip_last)
    raise ValueError(f"task.mask.kind: expected 'block' or 'random', got {kind!r}")
