"""The batched DVS event simulator: RGB frames in, event streams out (see pixel.py for the model)."""
