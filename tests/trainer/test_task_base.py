"""The Task base: options with did-you-mean, the typed step state, the seeded generators, the registries."""

from __future__ import annotations

import pytest
import torch

from evforge.errors import ConfigError
from evforge.finetune import get_task as finetune_task
from evforge.pretrain import get_task as pretrain_task
from evforge.trainer.task import StepState, Task, keys_generator, step_generator


class _Opts(Task):
    option_defaults = {"name": "t", "mode": "a", "aug": {"flip": 0.5, "shift": 2}, "model": {}}
    open_options = ("task.model",)

    def check_options(self, opts):
        self.require_choice(opts, "mode", ("a", "b"))


def test_options_merge_defaults_and_refuse_unknown_keys_with_a_suggestion():
    o = _Opts().options({"task": {"aug": {"shift": 4}, "model": {"anything": 1}}})
    assert o == {"name": "t", "mode": "a", "aug": {"flip": 0.5, "shift": 4}, "model": {"anything": 1}}
    with pytest.raises(ConfigError, match=r"task\.aug\.flp: unknown option; did you mean 'flip'"):
        _Opts().options({"task": {"aug": {"flp": 1.0}}})
    with pytest.raises(ConfigError, match=r"task\.mode: expected one of \('a', 'b'\), got 'c'"):
        _Opts().options({"task": {"mode": "c"}})


def test_step_state_reads_as_attributes_and_as_a_mapping():
    s = StepState(step=3, rank=1, scalars={"lr": 0.1, "teacher_temp": 0.04})
    assert s.step == s["step"] == 3 and s["teacher_temp"] == 0.04 and s.get("missing", 7) == 7
    assert {**s, "step": 0}["step"] == 0 and {**s}["lr"] == 0.1
    t = s.replace(step=4, lr=0.2)
    assert (t.step, t["lr"], s.step, s["lr"]) == (4, 0.2, 3, 0.1)  # a copy: the original is unchanged
    with pytest.raises(KeyError):
        s["nope"]


def test_step_generators_repeat_per_step_and_differ_across_steps_ranks_and_micro_batches():
    def draw(**kw):
        return torch.rand(4, generator=step_generator(0, 1, StepState(**kw))).tolist()

    assert draw(step=5) == draw(step=5)  # exact on resume
    assert len({tuple(draw(step=5)), tuple(draw(step=6)), tuple(draw(step=5, rank=1)),
                tuple(draw(step=5, micro_step=1))}) == 4
    a = torch.rand(3, generator=keys_generator(0, 2, {"key": ["x", "y"]}))
    assert torch.equal(a, torch.rand(3, generator=keys_generator(0, 2, {"key": ["x", "y"]})))
    assert not torch.equal(a, torch.rand(3, generator=keys_generator(0, 2, {"key": ["x", "z"]})))


def test_base_defaults_and_registries():
    t = _Opts()
    assert t.validation_step(None, {}, StepState()) == {} and t.state_dict() == {}
    assert t.validation_metrics({"loss.sum": torch.tensor(3.0), "loss.count": torch.tensor(4.0)}) == {"loss": 0.75}
    with pytest.raises(NotImplementedError, match="no backbone to export"):
        t.backbone_tensors({}, {}, "teacher", False)
    assert type(pretrain_task("ecddp")).__name__ == "ECDDPTask" and isinstance(finetune_task("segmentation"), Task)
    with pytest.raises(ValueError, match=r"unknown pretraining task 'ecdp' \(did you mean 'ecddp'\?\); "
                                         r"known: \['ecddp', 'mem', 'mem_dvae'\]"):
        pretrain_task("ecdp")
