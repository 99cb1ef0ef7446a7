"""Blosc chunks compressed in a thread pool, byte for byte as hdf5plugin's HDF5 filter writes them.

HDF5 runs a dataset's filters in the writing thread, one chunk at a time. For the Blosc filter (zstd, lz4)
the writer instead compresses whole chunks in a small thread pool with the very function the filter calls
(``blosc_compress_ctx`` of hdf5plugin's own Blosc plugin, same arguments: the dataset's cd_values, automatic
block size, one internal thread, output no larger than the input) and stores them with
``write_direct_chunk``; a chunk that does not compress is stored raw with filter-mask bit 0 set, as HDF5 does
when this optional filter declines. The files are the same chunk for chunk. Each (dtype, cd_values) is
checked once per process against HDF5's own filter output on an in-memory file; if anything differs, or
the library cannot be loaded, or only one CPU is usable, the writer uses the ordinary filtered writes.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import h5py
import hdf5plugin
import numpy as np

from evforge.formats.streamfile import CHUNK_EVENTS

_BLOSC_ID = 32001
_BLOSC_CNAMES = {0: b"blosclz", 1: b"lz4", 2: b"lz4hc", 3: b"snappy", 4: b"zlib", 5: b"zstd"}
_MAX_COMPRESS_THREADS = 4
_direct_lock = threading.Lock()
_blosc_fn = None  # ctypes blosc_compress_ctx; False once loading it failed
_direct_ok: dict[tuple, bool] = {}  # (dtype, cd_values) -> verified against HDF5's filter
_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def blosc_compress_ctx():
    """``blosc_compress_ctx`` from hdf5plugin's Blosc plugin library (the one HDF5 filters with), or None."""
    global _blosc_fn
    if _blosc_fn is None:
        _blosc_fn = False
        try:
            registered = getattr(getattr(hdf5plugin, "_utils", None), "registered_filters", {}).get("blosc")
            if registered is not None:
                lib = registered[1]
            else:
                lib = ctypes.CDLL(os.path.join(hdf5plugin.PLUGIN_PATH, "libh5blosc.so"))
            fn = lib.blosc_compress_ctx
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p,
                           ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _blosc_fn = fn
        except (AttributeError, OSError, TypeError, ValueError, IndexError):
            pass
    return _blosc_fn or None


def compress_chunk(fn, args: tuple, data: np.ndarray) -> tuple[int, np.ndarray]:
    """Blosc-compress one whole chunk as the HDF5 filter does: ``(status, buffer)``; status 0 = no gain."""
    clevel, shuffle, typesize, cname = args
    out = np.empty(data.nbytes, dtype=np.uint8)
    status = fn(clevel, shuffle, typesize, data.nbytes, data.ctypes.data, out.ctypes.data, data.nbytes, cname,
                0, 1)
    return status, out


def direct_args(ds: h5py.Dataset) -> tuple | None:
    """Blosc arguments for compressing ``ds``'s chunks outside HDF5, or None (then use ordinary writes)."""
    try:
        plist = ds.id.get_create_plist()
        if plist.get_nfilters() != 1 or ds.chunks != (CHUNK_EVENTS,):
            return None
        code, flags, cd, _ = plist.get_filter(0)
        cd = tuple(int(v) for v in cd)
        itemsize = ds.dtype.itemsize
        if (code != _BLOSC_ID or not flags & h5py.h5z.FLAG_OPTIONAL or len(cd) < 7 or cd[2] != itemsize
                or cd[3] != CHUNK_EVENTS * itemsize or cd[6] not in _BLOSC_CNAMES):
            return None
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if usable_cpus() < 2 or blosc_compress_ctx() is None:
        return None
    args = (cd[4], cd[5], itemsize, _BLOSC_CNAMES[cd[6]])
    key = (ds.dtype.str, cd)
    with _direct_lock:
        if key not in _direct_ok:
            _direct_ok[key] = _verify_direct(ds.dtype, cd, args)
    return args if _direct_ok[key] else None


def _verify_direct(dtype: np.dtype, cd: tuple, args: tuple) -> bool:
    """True when our chunks equal HDF5's own filter output (a compressible and an incompressible chunk)."""
    fn = blosc_compress_ctx()
    rng = np.random.default_rng(0)
    n = CHUNK_EVENTS
    smooth = (np.cumsum(rng.integers(0, 3, n)) % (1 << min(8 * dtype.itemsize, 20))).astype(dtype)
    noise = rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).view(dtype)
    try:
        with h5py.File(f"evforge-verify-{os.getpid()}-{id(cd)}.h5", "w", driver="core", backing_store=False) as f:
            ds = f.create_dataset("v", shape=(2 * n,), dtype=dtype, chunks=(n,), compression=_BLOSC_ID,
                                  compression_opts=cd)
            ds[:n], ds[n:] = smooth, noise
            for k, data in enumerate((smooth, noise)):
                mask, stored = ds.id.read_direct_chunk((k * n,))
                status, out = compress_chunk(fn, args, data)
                mine = (0, out[:status].tobytes()) if status > 0 else (1, data.tobytes()) if status == 0 else None
                if mine != (mask, bytes(stored)):
                    return False
    except Exception:  # any surprise: ordinary writes
        return False
    return True


def compress_pool() -> ThreadPoolExecutor:
    """The process's chunk-compression threads (a new pool after fork: threads do not survive it)."""
    global _pool, _pool_pid
    with _direct_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=min(usable_cpus(), _MAX_COMPRESS_THREADS),
                                       thread_name_prefix="evforge-shard-compress")
            _pool_pid = os.getpid()
        return _pool
