"""MEM (Klenk, Bonello, Koestler, Araslanov, Cremers: "Masked Event Modeling: Self-Supervised Pretraining for
Event Cameras", WACV 2024): a discrete-VAE tokenizer of event images, then BEiT-style masked modelling.

Built after the public code ``tum-vision/mem`` (``eventvae/``, ``mem/``, ``configs/*.conf``); each module says
what it follows and where it differs. Two trainer tasks: ``mem_dvae`` (the tokenizer) and ``mem``.
"""

from .dvae import DiscreteVAE, DVAEConfig, code_usage, gumbel_softmax
from .masking import BEiTMaskGenerator, RandomMaskGenerator, make_mask_generator
from .model import MEMConfig, MEMModel, patchify

__all__ = [
    "BEiTMaskGenerator", "DVAEConfig", "DiscreteVAE", "MEMConfig", "MEMModel", "RandomMaskGenerator",
    "code_usage", "gumbel_softmax", "make_mask_generator", "patchify",
]
