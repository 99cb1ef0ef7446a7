"""The real v2e ``EventEmulator`` as a benchmark baseline: find it, import it, time it on given frames.

v2e (SensorsINI/v2e, MIT) is not on PyPI and is not a dependency of evforge. The benchmarks look for a v2e
source tree (the folder that holds ``v2ecore/``): ``--v2e-root PATH``, by default the snapshot at
``../shared/reference/v2e`` next to the repository. Its emulator module imports GUI and camera packages at
module level that its core never uses (easygui, screeninfo, dv_processing, engineering_notation, tkinter,
cv2); where one is missing an empty stand-in module is put in ``sys.modules`` first, and OpenCV is taken
from ``EVFORGE_BENCH_EXTRA_PATH`` (a folder appended to ``sys.path``) when the environment lacks it. If
v2e's own imports need another environment, ``--v2e-python PY`` runs this file as a script under that
interpreter instead (frames in a ``.npy`` file, timings back as JSON).

What is timed is v2e's ``generate_events(frame, t)`` loop, exactly as for evforge: a fresh emulator, its
first frame (set-up, untimed), ``settle`` untimed frames, then the timed frames. The frames are 8-bit gray
(H, W) uint8 arrays, as v2e's own pipeline hands them over, and the parameters are evforge's preset under
v2e's names (:func:`emulator_kwargs`), so both simulate the same pixel model on the same frames.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "reference" / "v2e"

# v2e's module-level imports that its emulator core does not use, and what stands in for each when absent
_STAND_INS = {
    "screeninfo": {"get_monitors": lambda: []},
    "easygui": {},
    "dv_processing": {},
    "engineering_notation": {"EngNumber": lambda value, *a, **k: value},
}


def find_root(root: str | os.PathLike | None) -> Path | None:
    """The v2e source tree (a folder with ``v2ecore/emulator.py``), or None when it is not there."""
    path = Path(root) if root else DEFAULT_ROOT
    return path.resolve() if (path / "v2ecore" / "emulator.py").is_file() else None


def _stand_in(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__evforge_stand_in__ = True
    sys.modules[name] = module
    return module


def load_emulator(root: Path):
    """v2e's ``EventEmulator`` class, imported from ``root`` with stand-ins for its unused GUI imports.
    Returns (class, list of the stand-in module names)."""
    stood_in = []
    for name, attrs in _STAND_INS.items():
        try:
            importlib.import_module(name)
        except ImportError:
            _stand_in(name, **attrs)
            stood_in.append(name)
    try:
        import cv2  # noqa: F401
    except ImportError:
        extra = os.environ.get("EVFORGE_BENCH_EXTRA_PATH")
        if extra and extra not in sys.path:
            sys.path.append(extra)  # last, so that it cannot shadow the environment's own packages
        try:
            import cv2  # noqa: F401,F811
        except ImportError:
            _stand_in("cv2")  # used by v2e only to show and write videos
            stood_in.append("cv2")
    try:
        import tkinter.filedialog  # noqa: F401
    except ImportError:
        _stand_in("tkinter", filedialog=_stand_in("tkinter.filedialog"))
        stood_in.append("tkinter")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from v2ecore.emulator import EventEmulator

    for name in ("v2ecore", "v2ecore.emulator", "v2ecore.emulator_utils"):
        logging.getLogger(name).setLevel(logging.ERROR)  # it logs a warning for every frame without events
    return EventEmulator, stood_in


def emulator_kwargs(params) -> dict:
    """``EventEmulator(...)`` keyword arguments for evforge ``DVSParams`` (the same names in v2e)."""
    names = ("pos_thres", "neg_thres", "sigma_thres", "cutoff_hz", "leak_rate_hz", "shot_noise_rate_hz",
             "refractory_period_s", "leak_jitter_fraction", "noise_rate_cov_decades")
    return {name: float(getattr(params, name)) for name in names}


def time_emulator(emulator_cls, kwargs: dict, frames, times_s, settle: int, device: str = "cpu") -> dict:
    """Run ``generate_events`` over ``frames`` (N, H, W) uint8 at ``times_s``: frame 0 and ``settle`` more
    untimed, the rest timed (CUDA synchronised before the clock is read). Returns seconds, frames, events."""
    import torch

    em = emulator_cls(device=device, seed=1, **kwargs)
    for i in range(settle + 1):
        em.generate_events(frames[i], float(times_s[i]))
    events = 0
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(settle + 1, len(frames)):
        out = em.generate_events(frames[i], float(times_s[i]))
        events += 0 if out is None else len(out)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if hasattr(em, "cleanup"):
        em.cleanup()
    return {"seconds": seconds, "frames": len(frames) - settle - 1, "steps": len(frames) - settle - 1,
            "events": events}


class V2E:
    """The baseline, in this process or (``python`` given) in a subprocess under another interpreter."""

    def __init__(self, root: Path, python: str | None = None, threads: int | None = None):
        self.root, self.python, self.threads = root, python, threads
        self.stood_in: list[str] = []
        self._cls = None
        if python is None:
            self._cls, self.stood_in = load_emulator(root)

    def describe(self) -> str:
        how = f"subprocess ({self.python})" if self.python else "in process"
        stand = f"; stand-ins for {', '.join(self.stood_in)}" if self.stood_in else ""
        return f"v2e EventEmulator from {self.root} ({how}{stand})"

    def time(self, kwargs: dict, frames, times_s, settle: int, device: str = "cpu") -> dict:
        if self.python is None:
            return time_emulator(self._cls, kwargs, frames, times_s, settle, device)
        import numpy as np

        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / "frames.npy", np.asarray(frames))
            np.save(Path(tmp) / "times.npy", np.asarray(times_s, np.float64))
            cmd = [self.python, __file__, "--v2e-root", str(self.root), "--frames", str(Path(tmp) / "frames.npy"),
                   "--times", str(Path(tmp) / "times.npy"), "--kwargs", json.dumps(kwargs), "--settle", str(settle),
                   "--device", device] + (["--threads", str(self.threads)] if self.threads else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"v2e subprocess failed: {out.stderr.strip().splitlines()[-1:]}")
            return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    """Script mode (for ``--v2e-python``): time v2e on frames from a .npy file, print JSON."""
    p = argparse.ArgumentParser(description="time v2e's EventEmulator on frames (see module docstring)")
    p.add_argument("--v2e-root", required=True)
    p.add_argument("--frames", required=True, help=".npy of (N, H, W) uint8 gray frames")
    p.add_argument("--times", required=True, help=".npy of N frame times in seconds")
    p.add_argument("--kwargs", required=True, help="EventEmulator keyword arguments as JSON")
    p.add_argument("--settle", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    import numpy as np
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    root = find_root(a.v2e_root)
    if root is None:
        print(f"no v2e source tree at {a.v2e_root}", file=sys.stderr)
        return 2
    cls, _ = load_emulator(root)
    res = time_emulator(cls, json.loads(a.kwargs), np.load(a.frames), np.load(a.times), a.settle, a.device)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
