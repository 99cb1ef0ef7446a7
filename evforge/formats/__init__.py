"""Readers of raw event-camera recordings (bottom of the data flow: bytes -> event arrays).

:func:`open_recording` opens any supported recording (AEDAT4, Prophesee RAW EVT2/EVT3 and DAT, DSEC
``events.h5``, evforge stream files) and streams it as :data:`~evforge.events.EVENT_DTYPE` chunks.
"""

from .recording import FORMATS, Recording, find_recordings, open_recording

__all__ = ["FORMATS", "Recording", "find_recordings", "open_recording"]
