"""MEM (Klenk, Bonello, Koestler, Araslanov, Cremers: "Masked Event Modeling: Self-Supervised Pretraining for
Event Cameras", WACV 2024): a discrete-VAE tokenizer of event images, then BEiT-style masked modelling.

Built after the public code ``tum-vision/mem`` (``eventvae/``, ``mem/``, ``configs/*.conf``, commit c60c930);
each module says what it follows and where it differs, ``docs/FIDELITY.md`` lists every difference and the
option reproducing it. Two trainer tasks: ``mem_dvae`` (the tokenizer) and ``mem``; :func:`mem_inputs` is the
input pipeline they and finetuning share.
"""

from .dvae import DiscreteVAE, DVAEConfig, code_usage, gumbel_softmax
from .inputs import MEMInputConfig, mem_inputs
from .masking import BEiTMaskGenerator, RandomMaskGenerator, make_mask_generator
from .model import MEMConfig, MEMModel, patchify
from .restart import CodeRestartConfig, CodeRestarter

__all__ = [
    "BEiTMaskGenerator", "CodeRestartConfig", "CodeRestarter", "DVAEConfig", "DiscreteVAE", "MEMConfig",
    "MEMInputConfig", "MEMModel", "RandomMaskGenerator", "code_usage", "gumbel_softmax", "make_mask_generator",
    "mem_inputs", "patchify",
]
