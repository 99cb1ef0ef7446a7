"""evforge.simulator makes OpenMP threads wait passively unless the user chose otherwise (see its __init__)."""

import os
import subprocess
import sys


def _policy_after_import(env_value):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    code = "import os, evforge.simulator, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_passive_by_default_and_the_users_choice_kept():
    assert _policy_after_import(None) == "PASSIVE"
    assert _policy_after_import("ACTIVE") == "ACTIVE"
