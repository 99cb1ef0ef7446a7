"""Where a simulation runs beyond one device: one worker process per device, or Ray tasks on a cluster.

:func:`run_workers` starts one process per device (``spawn``: CUDA cannot be forked) and hands out sequences
from one queue in the parent, longest first: a worker asks for the next sequence whenever a batch slot frees,
so a long sequence never waits behind a partition. Parent and worker talk over a private pipe each (no shared
queue whose lock a killed worker could take with it). A worker that dies fails the sequences it held, with one
line naming its device and exit status; the others go on. Workers end with their parent
(:func:`evforge.watchdog.watch_parent`), so a killed run leaves no process writing into its folder; the
``*.tmp-<pid>`` files they leave are removed by the next run under the folder lock.

:func:`run_ray` submits one task per group of up to ``cfg.batch`` sequences of one output size and similar
length (one task per sequence with ``batch=1``), each asking for a GPU when the device is CUDA (Ray then
shows the task only its GPU, ``cuda``), retried up to :data:`RAY_RETRIES` times when its worker dies; results
stream back as tasks finish. A task's sequences are simulated exactly as in a local run.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import traceback
from collections import deque
from dataclasses import asdict, replace
from multiprocessing import connection, get_context
from pathlib import Path

from evforge.errors import OutputError

__all__ = ["run_workers", "run_ray", "RAY_RETRIES"]

logger = logging.getLogger(__name__)

RAY_RETRIES = 2  # times a task whose worker died is run again (a failed sequence is a result, not retried)
_PROGRESS_EVERY_S = 0.2  # a worker sends its frame and event counts at most this often


# ------------------------------------------------------------------------------------ local processes
class _PipeFeed:
    """A worker's feed: asks the parent for the next sequence; keeps one of another output size for later."""

    def __init__(self, conn, sequences: list):
        self.conn, self.sequences = conn, sequences
        self.carry = None  # a pulled sequence of another size than the group running
        self.left: dict = {}  # size -> sequences of that size the parent still had, at the last answer
        self.done = False

    def pull(self, size=None):
        if self.carry is None and not self.done:
            self.conn.send(("next",))
            answer = self.conn.recv()
            if answer is None:
                self.done = True
            else:
                index, left = answer
                self.carry = self.sequences[index]
                self.left[self.carry[1]] = left
        if self.carry is not None and (size is None or self.carry[1] == size):
            item, self.carry = self.carry, None
            return item
        return None

    def remaining(self, size) -> int:
        return self.left.get(size, 0)


class _PipeReport:
    """A worker's report to the parent: sequences started and finished, frames and events (batched)."""

    def __init__(self, conn):
        self.conn, self.frames, self.events, self.last = conn, 0, 0, time.monotonic()

    def advance(self, frames: int, events: int) -> None:
        self.frames += frames
        self.events += events
        if time.monotonic() - self.last > _PROGRESS_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.frames or self.events:
            self.conn.send(("progress", self.frames, self.events))
        self.frames, self.events, self.last = 0, 0, time.monotonic()

    def finish(self, result) -> None:
        self.flush()
        self.conn.send(("result", asdict(result)))


def _worker_main(conn, payload: bytes, device: str, threads: int, parent_pid: int) -> None:
    """A worker process: simulate what the parent hands out on ``device`` until it has nothing left."""
    from evforge.errors import OutputError
    from evforge.watchdog import watch_parent

    watch_parent(parent_pid)
    import torch

    torch.set_num_threads(threads)  # the CPU kernels' threads too (cpu_kernels follows torch)
    from .pipeline import simulate_on_device

    sequences, out_dir, cfg, interpolator = pickle.loads(payload)
    report = _PipeReport(conn)
    try:
        simulate_on_device(_PipeFeed(conn, sequences), out_dir, cfg, device, interpolator=interpolator,
                           report=report)
        report.flush()
        conn.send(("exit",))
    except OutputError as err:  # a full or read-only disk: the parent stops the run with it (exit 3)
        report.flush()
        conn.send(("output_error", err.path, err.problem))
        conn.close()
        raise SystemExit(1)
    except BaseException as err:  # not a sequence's fault (those are results): the worker's, e.g. CUDA
        try:
            conn.send(("crash", f"{type(err).__name__}: {' '.join(str(err).split())}",
                       traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1)
    finally:
        conn.close()


def run_workers(todo: list, out_dir, cfg, devices: list[str], report, *, interpolator=None) -> None:
    """Simulate ``todo`` (``(sequence, size)`` pairs, in the order to start them) on one process per device.

    Results go to ``report.finish`` as they come; a worker that dies or crashes fails the sequences it held
    (and a crash is logged at ERROR, ``worker on <device> failed: <why>``).
    """
    from .run_plan import SequenceResult, fail, output_path

    ctx = get_context("spawn")
    payload = pickle.dumps((todo, Path(out_dir), cfg, interpolator))
    cpu_workers = sum(str(d).startswith("cpu") for d in devices)
    threads = max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
    queue = deque(range(len(todo)))
    environment = None  # the first OutputError a worker met: it ends the run once the workers stop
    workers = []  # [process, connection, device, {names held}]
    try:
        for device in devices:
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(theirs, payload, device, threads, os.getpid()),
                               name=f"evforge-simulate[{device}]", daemon=True)
            proc.start()
            theirs.close()
            workers.append([proc, ours, device, set()])
        live = list(workers)
        while live:
            ready = connection.wait([w[1] for w in live] + [w[0].sentinel for w in live])
            for w in list(live):
                proc, conn, device, held = w[:4]  # w[4]: why it ended, once known
                gone = False
                while not gone and (conn in ready or proc.sentinel in ready) and conn.poll():
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        gone = True
                        break
                    if msg[0] == "next":
                        if queue and environment is None:
                            i = queue.popleft()
                            held.add(todo[i][0].name)
                            left = sum(todo[j][1] == todo[i][1] for j in queue)
                            conn.send((i, left))
                        else:
                            conn.send(None)
                    elif msg[0] == "progress":
                        report.advance(msg[1], msg[2])
                    elif msg[0] == "result":
                        result = SequenceResult(**{**msg[1], "path": Path(msg[1]["path"])})
                        held.discard(result.name)
                        report.finish(result)
                    elif msg[0] == "output_error":
                        environment = environment or OutputError(msg[1], msg[2])
                        w.append(None)  # not its sequences' fault: they stay pending, the run ends in one line
                    elif msg[0] == "crash":
                        logger.error("worker on %s failed: %s", device, msg[1])
                        w.append(msg[1])
                    elif msg[0] == "exit":
                        gone = True
                if gone or proc.sentinel in ready:
                    proc.join()
                    why = w[4] if len(w) > 4 else f"exit status {proc.exitcode}"
                    for name in sorted(held) if why is not None else ():  # failed with its reason
                        seq = next(s for s, _ in todo if s.name == name)
                        r = SequenceResult(name, output_path(out_dir, name), "pending", device=device)
                        fail(r, RuntimeError(f"the worker on {device} ended ({why}) while simulating it"))
                        report.advance(len(seq), 0)  # at most: the bar may run a little ahead
                        report.finish(r)
                    held.clear()
                    conn.close()
                    live.remove(w)
        if environment is not None:
            raise environment
        for i in queue:  # every worker died before these started
            seq = todo[i][0]
            r = SequenceResult(seq.name, output_path(out_dir, seq.name), "pending")
            fail(r, RuntimeError("not simulated: every worker process ended"))
            report.finish(r)
    finally:
        for proc, conn, *_ in workers:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()


# -------------------------------------------------------------------------------------------------- Ray
def _ray_task(items: list, out_dir, cfg, device: str, interpolator) -> list[dict]:
    """One Ray task: simulate ``items`` (``(sequence, size)``) batched on ``device``; their results as dicts."""
    from .pipeline import ListFeed, simulate_on_device

    class Collect:
        def __init__(self):
            self.results = []

        def advance(self, frames, events):
            pass

        def finish(self, result):
            self.results.append(asdict(result))

    collect = Collect()
    simulate_on_device(ListFeed(items), out_dir, cfg, device, interpolator=interpolator, report=collect)
    return collect.results


def ray_tasks(todo: list, batch: int) -> list[list]:
    """``todo`` cut into tasks: consecutive runs (same output size, similar length) of at most ``batch``."""
    tasks: list[list] = []
    for item in todo:
        if tasks and len(tasks[-1]) < max(1, batch) and tasks[-1][0][1] == item[1]:
            tasks[-1].append(item)
        else:
            tasks.append([item])
    return tasks


def run_ray(todo: list, out_dir, cfg, device: str, report, *, address: str | None = None,
            gpus: float | None = None, interpolator=None) -> None:
    """Simulate ``todo`` as Ray tasks (see the module docstring). ``address=None`` starts a local Ray on
    loopback (or uses the one this process is connected to); ``gpus``: per task (default 1 for CUDA, else 0)."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("executor='ray' needs the ray package (pip install ray)") from None
    from .run_plan import SequenceResult, fail, output_path

    started = False
    if not ray.is_initialized():
        if address in (None, "local"):
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private cluster on loopback: no token file
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
        started = True
    try:
        if device == "auto":  # the cluster's, not this driver's: CUDA when it has GPUs
            device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
        if gpus is None:
            gpus = 1 if device.startswith("cuda") else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=RAY_RETRIES)(_ray_task)
        pending = {}
        for items in ray_tasks(todo, cfg.batch):
            ref = task.remote(items, Path(out_dir), replace(cfg, device=device), device, interpolator)
            pending[ref] = items
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                items = pending.pop(ref)
                try:
                    rows = ray.get(ref)
                except Exception as err:  # the task failed RAY_RETRIES + 1 times: its sequences fail
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, OutputError):
                        raise OutputError(cause.path, cause.problem) from None
                    why = " ".join(str(err).split())[:300]
                    for seq, _ in items:
                        r = SequenceResult(seq.name, output_path(out_dir, seq.name), "pending", device=device)
                        fail(r, RuntimeError(f"Ray task failed ({type(err).__name__}: {why})"))
                        report.advance(len(seq), 0)
                        report.finish(r)
                    continue
                for row in rows:
                    result = SequenceResult(**{**row, "path": Path(row["path"])})
                    report.advance(next(len(s) for s, _ in items if s.name == result.name), result.events)
                    report.finish(result)
    finally:
        if started:
            ray.shutdown()
