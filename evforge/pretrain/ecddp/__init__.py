"""ECDDP (Yang, Pan, Liu: "Event Camera Data Dense Pre-training", ECCV 2024) model pieces.

Built after the public code Yan98/Event-Camera-Data-Dense-Pre-training (config/pretrain/swin_small.yml,
model/pretrain_model.py, model/network/{swin_pretrain,layers,loss}.py); each module says what it follows and
where it differs.
"""

from .backbone import FusedSwin
from .heads import AttPool, DINOHead
from .kmeans import cosine_kmeans
from .loss import ECDDPLoss, cross_entropy
from .masking import BlockMaskGenerator
from .model import ECDDPConfig, ECDDPModel, ema_momentum, teacher_temperature
from .multicrop import Crops, MultiCrop, MultiCropOutput, crop_grid, resample_mask
from .sinkhorn import sinkhorn_knopp

__all__ = [
    "AttPool", "BlockMaskGenerator", "Crops", "DINOHead", "ECDDPConfig", "ECDDPLoss", "ECDDPModel",
    "FusedSwin", "MultiCrop", "MultiCropOutput", "cosine_kmeans", "crop_grid", "cross_entropy",
    "ema_momentum", "resample_mask", "sinkhorn_knopp", "teacher_temperature",
]
