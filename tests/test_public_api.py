"""The public API: every name in evforge.__all__ is the object its module defines; importing evforge is cheap."""

import importlib
import subprocess
import sys

import pytest

import evforge


@pytest.mark.parametrize("name", evforge.__all__)
def test_public_name_is_the_defining_modules_object(name):
    module = importlib.import_module(evforge._EXPORTS[name])
    assert getattr(evforge, name) is getattr(module, name)
    assert name in dir(evforge)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'simulate_frame'"):
        evforge.simulate_frame  # noqa: B018


def test_import_evforge_does_not_import_torch():
    code = "import sys, evforge; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_readme_example_runs_through_the_public_api():
    import numpy as np

    frames = np.random.default_rng(0).uniform(20, 200, (4, 24, 32)).astype(np.float32)
    events = evforge.simulate_frames(frames, np.arange(4) * 10_000, evforge.get_preset("noisy"), seed=1)
    assert events.dtype == evforge.EVENT_DTYPE and len(events) > 0
    assert np.all(np.diff(events["t"]) >= 0)
