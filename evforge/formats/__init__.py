"""File formats and readers, the bottom of the data flow: bytes <-> event arrays.

* :mod:`.events` -- the event array (``EVENT_DTYPE``, a structured numpy array sorted by ``t``) and its checks;
* :mod:`.atomic` -- atomic writes (temp file, then rename) used by every writer;
* :mod:`.hdf5` (root attrs, refusing data stored outside a file) and :mod:`.h5guard` (writes that cannot crash
  HDF5): the HDF5 core shared by stream files and shards;
* :mod:`.streamfile` -- stream files (one sequence: events + frame times);
* :mod:`.shards` -- shard files (many samples) and :mod:`.manifest` (a dataset's manifest, checksums, stats),
  :mod:`.completion` (the incomplete-build marker);
* :mod:`.recording` (with :mod:`.prophesee`) -- raw camera recordings (AEDAT4, Prophesee RAW EVT2/EVT3 and DAT,
  DSEC ``events.h5``, stream files) streamed as event chunks; :mod:`.decoders` -- the files of the public
  datasets (N-Caltech101 ``.bin``, N-ImageNet ``.npz``, N-Cars ``.dat``).

:func:`open_recording` and the recording names are importable from here, loaded on first use so that importing
one format does not import the others.
"""

from __future__ import annotations

from evforge.registry import lazy_exports

_EXPORTS = {name: "evforge.formats.recording" for name in ("FORMATS", "Recording", "find_recordings",
                                                             "open_recording")}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports("evforge.formats", _EXPORTS, globals())
