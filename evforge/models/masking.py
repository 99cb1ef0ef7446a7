"""BEiT/iBOT block masks on a token grid: ECDDP's masked global crops (the iBOT patch loss) and, with a fixed count,
MEM's BEiT masks (:mod:`evforge.pretrain.mem.masking`).

Public code (``MaskingGenerator`` and ``collate_data`` in model/pretrain_model.py): on the stride-16 grid of a
192 global crop (12 x 12 = 144 tokens), half of the global crops get a mask; the i-th of the n masked crops
draws its ratio uniformly from the i-th of n equal slices of [0.1, 0.5] (stratified), the masks are shuffled
over the crops, and each mask is grown from rectangles of 4 .. 0.5*144 patches with aspect ratio in
[0.3, 1/0.3] (log-uniform) until the target count is reached (or 10 draws in a row fail to add anything).

Legacy quirk (``legacy_ratio=True``): the public code turns the ratio into a patch count with
``int(N * ratio)`` where ``N = self.n_tokens ** 2`` and ``n_tokens`` is a constructor default of 8 that its
config never sets, so N = 64 while the grid has 144 patches: the masks cover 64/144 * [0.1, 0.5], an
effective 4.4-22.2 % instead of 10-50 %. The default counts from the real grid size.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

# The public code's hard-coded token count (n_tokens = 8, squared), used by ``legacy_ratio``.
LEGACY_NUM_TOKENS = 64


class BlockMaskGenerator:
    """Per-sample rectangular block masks on a (h, w) token grid.

    grid: (h, w) token grid (global crop size / 16). ratio_range: masked fraction range of a masked crop.
    min_num_patches / max_num_patches: area range of one block (max defaults to half the grid, as public).
    aspect: (min, max) block aspect h/w, drawn log-uniformly. mask_probability: fraction of crops masked.
    legacy_ratio: count patches from 64 instead of h*w (the public code's 4-22 % quirk, see module doc).
    """

    def __init__(
        self,
        grid: tuple[int, int] | int = (12, 12),
        ratio_range: tuple[float, float] = (0.1, 0.5),
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        aspect: tuple[float, float] = (0.3, 1 / 0.3),
        mask_probability: float = 0.5,
        legacy_ratio: bool = False,
    ):
        self.height, self.width = (grid, grid) if isinstance(grid, int) else tuple(grid)
        self.num_patches = self.height * self.width
        self.ratio_range = tuple(ratio_range)
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
        self.mask_probability = mask_probability
        self.legacy_ratio = legacy_ratio

    @property
    def count_base(self) -> int:
        """Patch count a ratio is multiplied by: the grid size, or 64 with ``legacy_ratio``."""
        return LEGACY_NUM_TOKENS if self.legacy_ratio else self.num_patches

    def _add_block(self, mask: np.ndarray, max_mask_patches: float, rng: random.Random, blocks: list) -> int:
        """Try up to 10 random rectangles; paint the first one that adds 1..max_mask_patches new patches."""
        for _ in range(10):
            area = rng.uniform(self.min_num_patches, max_mask_patches)
            ar = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * ar)))  # h * w ~ area, h / w ~ ar
            w = int(round(math.sqrt(area / ar)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                new = h * w - int(mask[top : top + h, left : left + w].sum())
                if 0 < new <= max_mask_patches:  # must add something, and not overshoot the budget
                    mask[top : top + h, left : left + w] = True
                    blocks.append((top, left, h, w, ar))
                    return new
        return 0

    def sample(self, num_masking_patches: int, rng: random.Random, return_blocks: bool = False):
        """One (h, w) bool mask with about ``num_masking_patches`` patches (fewer if blocks stop fitting).

        With ``return_blocks`` also the painted rectangles as (top, left, h, w, drawn_aspect) tuples.
        """
        mask = np.zeros((self.height, self.width), dtype=bool)
        blocks: list = []
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            delta = self._add_block(mask, budget, rng, blocks)
            if delta == 0:
                break
            count += delta
        return (mask, blocks) if return_blocks else mask

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Masks for ``batch_size`` crops: (batch_size, h*w) bool; ``int(batch_size * mask_probability)`` of
        them masked with stratified ratios, the rest empty, in random order (as the public ``collate_data``)."""
        device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
        rng = random.Random(seed)
        n_masked = int(batch_size * self.mask_probability)
        lo, hi = self.ratio_range
        edges = np.linspace(lo, hi, n_masked + 1)
        masks = [
            self.sample(int(self.count_base * rng.uniform(edges[i], edges[i + 1])), rng) for i in range(n_masked)
        ]
        masks += [np.zeros((self.height, self.width), dtype=bool)] * (batch_size - n_masked)
        rng.shuffle(masks)
        if not masks:
            return torch.zeros(0, self.num_patches, dtype=torch.bool)
        return torch.from_numpy(np.stack(masks).reshape(batch_size, -1))
