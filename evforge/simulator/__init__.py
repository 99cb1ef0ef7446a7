"""The batched DVS event simulator: RGB frames in, event streams out (see pixel.py for the model)."""

import os as _os

# OpenMP worker threads (torch's and numba's) by default spin for a while after every parallel region. The
# simulator runs short parallel kernels between frame-decoding and writing threads, and the spinning takes
# their cores: `evforge simulate` of 300 640x480 PNG frames on 2 cores shared with other work took 17.6-22.6 s
# of CPU spinning and 5.4 s with passive waits. A passive wait costs microseconds per kernel launch. The
# runtimes read this when they start, so it applies where evforge.simulator is imported before torch (as in
# the `evforge` command); a value the user set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
