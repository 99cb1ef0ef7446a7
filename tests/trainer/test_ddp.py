"""2-process DDP on CPU (gloo): launched by Fabric (devices=2) and by torchrun, in subprocesses with a timeout."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from evforge.trainer import Trainer, load_checkpoint
from evforge.trainer.toy import ToyTask, toy_config

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from evforge.trainer import Trainer
    from evforge.trainer.toy import ToyTask, toy_config

    out, devices = sys.argv[1], sys.argv[2]
    cfg = toy_config(devices="auto" if devices == "auto" else int(devices), strategy="ddp",
                     accumulate_grad_batches=2, max_steps=6, val_every_n_steps=3, stop_signals=["SIGUSR1"])
    cfg["task"]["dropout"] = 0.0  # per-rank dropout masks would make the loss differ from one process
    task = ToyTask()
    tr = Trainer(cfg, task, out_dir=out, resume=None)
    summary = tr.fit()
    params = torch.cat([p.detach().flatten() for p in tr.raw_model.state_dict().values()])
    with open(f"{out}/rank{tr.rank}.json", "w") as f:
        json.dump({"rank": tr.rank, "world": tr.world_size, "seen": task.seen, "params": params.tolist(),
                   "history": tr.history, "summary": summary}, f)
    tr.close()
''')


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """One process, same global batch (8 = 2 ranks x 4), same data order: its logged history."""
    tmp_path = tmp_path_factory.mktemp("single")
    cfg = toy_config(accumulate_grad_batches=2, max_steps=6, val_every_n_steps=3)
    cfg["task"]["dropout"] = 0.0
    cfg["data"]["batch_size"] = 8
    tr = Trainer(cfg, ToyTask(), out_dir=tmp_path / "single", resume=None)
    tr.fit()
    tr.close()
    return tr.history


def _check(out: Path, reference: list[dict]) -> None:
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["world"], r1["world"]) == (2, 2)
    # different shards: disjoint indices in every micro-batch, together the single process's batch
    for a, b in zip(r0["seen"], r1["seen"]):
        assert not set(a) & set(b)
    assert r0["params"] == r1["params"]  # replicas stay identical, bit for bit
    ref_train = [h["loss"] for h in reference if h["split"] == "train"]
    ddp_train = [h["loss"] for h in r0["history"] if h["split"] == "train"]
    assert ddp_train == pytest.approx(ref_train, rel=1e-5, abs=1e-6)
    ref_val = [h["mse"] for h in reference if h["split"] == "val"]
    assert [h["mse"] for h in r0["history"] if h["split"] == "val"] == pytest.approx(ref_val, rel=1e-5)
    assert [h["loss"] for h in r1["history"] if h["split"] == "train"] == ddp_train  # logs are rank means
    ck = load_checkpoint(out / "checkpoints" / "last.ckpt")  # weights_only
    assert ck["progress"]["step"] == 6 and ck["progress"]["world_size"] == 2
    assert len(ck["rng"]) == 2 and not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "train"] == list(range(1, 7))


def test_ddp_fabric_launch(tmp_path, reference, launch):
    """devices=2 on one machine: fabric.launch() starts the second process itself."""
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    launch([sys.executable, str(script), str(tmp_path / "fabric"), "2"], tmp_path, out_dir=tmp_path / "fabric")
    _check(tmp_path / "fabric", reference)


def test_ddp_torchrun(tmp_path, reference, launch):
    """torchrun --nproc_per_node 2: devices "auto" are read from torchrun's environment."""
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "torchrun"), "auto"], tmp_path, out_dir=tmp_path / "torchrun")
    _check(tmp_path / "torchrun", reference)


def test_launcher_retries_a_gloo_abort_once_and_fails_on_a_second(tmp_path, launch):
    """The one retry of tests/trainer/conftest.py: only for gloo's own abort, only once, in a fresh folder."""
    gloo_abort = "terminate called without an active exception"  # tests/trainer/conftest.py's GLOO_ABORT
    out = tmp_path / "run"
    script = tmp_path / "flaky.py"
    script.write_text(textwrap.dedent(f'''
        import pathlib, sys
        out, count = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
        n = int(count.read_text()) + 1 if count.exists() else 1
        count.write_text(str(n))
        if out.exists():
            sys.exit("stale output folder")
        out.mkdir()
        if n <= int(sys.argv[3]):
            print({gloo_abort!r}, flush=True)
            sys.exit(1)
        print("ok")
    '''))
    with pytest.warns(UserWarning, match="retrying the run once"):
        assert "ok" in launch([sys.executable, str(script), str(out), str(tmp_path / "n1"), "1"], tmp_path,
                              out_dir=out)
    with pytest.raises(pytest.fail.Exception, match="exit status 1"), pytest.warns(UserWarning):
        launch([sys.executable, str(script), str(tmp_path / "run2"), str(tmp_path / "n2"), "2"], tmp_path,
               out_dir=tmp_path / "run2")
    script.write_text("import sys; print('Traceback: a real error'); sys.exit(1)")
    with pytest.raises(pytest.fail.Exception, match="a real error"):
        launch([sys.executable, str(script)], tmp_path)  # any other failure: no retry
