"""Schedules: values at the key steps of each kind, epoch conversion, batch scaling, errors."""

from __future__ import annotations

import math

import pytest

from evforge.trainer.config import ConfigError
from evforge.trainer.schedules import Schedule, Schedules, make_schedule


def test_constant():
    for spec in (0.05, {"constant": 0.05}, {"constant": {"value": 0.05}}):
        s = make_schedule(spec)
        assert s.value(0) == s.value(10**6) == 0.05
    assert make_schedule({"constant": {"value": 1e-3, "batch_ref": 256}}, global_batch=1024).value(5) == 4e-3


def test_warmup_cosine_key_steps():
    # ECDDP: 5e-4 * B / 256, warmup 10 epochs, cosine to 1e-6 over 300 epochs
    s = make_schedule({"warmup_cosine": {"start": 0.0, "peak": 5e-4, "end": 1e-6, "warmup_epochs": 10,
                                         "epochs": 300, "batch_ref": 256}}, steps_per_epoch=100, global_batch=1024)
    assert (s.warmup, s.total, s.peak) == (1000, 30000, 2e-3)
    assert s.value(0) == 0.0
    assert s.value(500) == pytest.approx(1e-3)  # linear warmup
    assert s.value(1000) == pytest.approx(2e-3)  # the peak at the end of the warmup
    mid = 1000 + (30000 - 1000) // 2
    assert s.value(mid) == pytest.approx((2e-3 + 1e-6) / 2)
    assert s.value(30000) == pytest.approx(1e-6) and s.value(40000) == pytest.approx(1e-6)
    values = [s.value(i) for i in range(1000, 30001, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after the warmup


def test_cosine_whole_run_by_default():
    # EMA momentum 0.992 -> 1 and weight decay 0.04 -> 0.4 over the run
    ema = make_schedule({"cosine": {"start": 0.992, "end": 1.0}}, total_steps=1000)
    assert ema.value(0) == 0.992 and ema.value(500) == pytest.approx(0.996)
    assert ema.value(1000) == 1.0 and ema.value(2000) == 1.0
    wd = make_schedule({"cosine": {"start": 0.04, "end": 0.4}}, total_steps=1000)
    assert wd.value(0) == pytest.approx(0.04) and wd.value(1000) == pytest.approx(0.4)


def test_linear_then_constant():
    # teacher temperature 0.04 -> 0.07 over 30 epochs, then constant
    s = make_schedule({"linear": {"start": 0.04, "end": 0.07, "epochs": 30}}, steps_per_epoch=10, total_steps=3000)
    assert s.value(0) == 0.04 and s.value(150) == pytest.approx(0.055)
    assert s.value(300) == pytest.approx(0.07) and s.value(2999) == pytest.approx(0.07)
    c = make_schedule({"cosine": {"start": 0.04, "end": 0.07, "total_steps": 300}})
    assert c.value(300) == pytest.approx(0.07) and c.value(10**5) == pytest.approx(0.07)


def test_bundle():
    sch = Schedules({"lr": {"warmup_cosine": {"peak": 1.0, "end": 0.0, "warmup_steps": 2}},
                     "teacher_temp": {"linear": {"start": 0.04, "end": 0.07, "total_steps": 4}}},
                    steps_per_epoch=5, total_steps=10, defaults={"lr": 0.5, "weight_decay": 0.05})
    at = sch.at(2)
    assert at["lr"] == 1.0 and at["weight_decay"] == 0.05 and at["teacher_temp"] == pytest.approx(0.055)
    assert sch.at(10)["lr"] == pytest.approx(0.0) and "teacher_temp" in sch
    assert math.isclose(sch.at(6)["lr"], 0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("spec,msg", [
    ({"cosin": {"start": 0, "end": 1}}, "unknown schedule 'cosin'"),
    ({"cosine": {"start": 0, "end": 1, "epoch": 3}}, r"cosine\.epoch: unknown option"),
    ({"cosine": {"start": 0}}, "missing end"),
    ({"cosine": {"start": "a", "end": 1}}, "expected a number"),
    ({"cosine": {"start": 0, "end": 1, "epochs": 3, "total_steps": 3}}, "not both"),
    ({"linear": {"start": 0, "end": 1, "epochs": 3}}, "steps_per_epoch"),
    ({"constant": {"value": 1, "batch_ref": 256}}, "global batch"),
    ([1, 2], "expected a number"),
])
def test_errors_name_the_schedule(spec, msg):
    with pytest.raises(ConfigError, match=r"schedules\.x.*" + msg):
        make_schedule(spec, name="schedules.x", total_steps=None if "steps_per_epoch" in msg else 100)


def test_warmup_longer_than_run():
    """A short smoke run of a long-warmup config is fine: it only warms up."""
    s = make_schedule({"warmup_cosine": {"peak": 1.0, "end": 0.0, "warmup_steps": 20}}, total_steps=10)
    assert s.value(5) == 0.25 and s.value(10) == 0.5


def test_schedule_is_plain_data():
    s = Schedule("linear", 0.0, 1.0, total=4)
    assert [s(i) for i in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
