"""evforge: event-camera pretraining data, from RGB video to pretrained backbones."""

__version__ = "0.1.0"
