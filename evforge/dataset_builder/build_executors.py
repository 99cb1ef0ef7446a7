"""Where a build's units run: in this process, in joblib (loky) worker processes, or as Ray tasks; results are
yielded as units finish (the build orders them)."""

from __future__ import annotations

import os
from typing import Iterator

from .build_units import UnitResult, WorkUnit, run_unit
from .converters import get_converter

__all__ = ["EXECUTORS", "unit_results"]

EXECUTORS = ("local", "ray")


def unit_results(units: list[WorkUnit], args: tuple, *, workers: int, executor: str, address) -> Iterator[UnitResult]:
    """Run ``run_unit(name, options, unit, out, plan_params, reuse)`` for every unit; yield results as they finish."""
    name, options, out, plan_params, reuse = args
    if executor == "ray":
        yield from _ray_results(units, args, workers=workers, address=address)
    elif workers > 1:
        from joblib import Parallel, delayed

        parallel = Parallel(n_jobs=workers, return_as="generator_unordered")
        yield from parallel(delayed(run_unit)(name, options, u, out, plan_params, reuse, os.getpid())
                            for u in units)
    else:
        for u in units:
            yield run_unit(name, options, u, out, plan_params, reuse)


def _ray_results(units, args, *, workers: int, address) -> Iterator[UnitResult]:
    try:
        import ray
    except ImportError:
        raise RuntimeError("executor='ray' needs the ray package (pip install ray)") from None
    name, options, out, plan_params, reuse = args
    started = False
    if not ray.is_initialized():
        if address in (None, "local"):
            # a private single-machine cluster on loopback: no token file, no dashboard
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address="local", num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
        started = True
    try:
        resources = getattr(get_converter(name), "unit_resources", lambda params: {})(plan_params["params"])
        task = ray.remote(**{"num_cpus": 1, **resources})(run_unit)  # e.g. a GPU for units that simulate
        pending = [task.remote(name, options, u, out, plan_params, reuse) for u in units]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield ray.get(ref)
    finally:
        if started:
            ray.shutdown()
