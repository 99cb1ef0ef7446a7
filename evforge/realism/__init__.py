"""Real against simulated events: statistics of an event source, a side-by-side report, noise calibration.

:mod:`.sources` loads any event source (recordings, stream files, shards, datasets, ATIS ``.bin``),
:mod:`.stats` computes the realism statistics, :mod:`.compare` writes the report of two sources and
:mod:`.calibrate` estimates the pixel model's noise parameters from a recording.
"""
