import math

import pytest

from bitflow.schedules import LRSchedule, phase_in, rewarmup


def test_cosine_warmup_values():
    s = LRSchedule("cosine", total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert s(0) == pytest.approx(0.1)  # (0 + 1) / 10
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay: cos(pi/2) = 0
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)


def test_constant_linear_and_wsd_values():
    assert LRSchedule("constant", total_steps=100, warmup_steps=4)(50) == 1.0
    lin = LRSchedule("linear", total_steps=100, warmup_steps=0, min_lr_ratio=0.0)
    assert lin(25) == pytest.approx(0.75)
    wsd = LRSchedule("wsd", total_steps=100, warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    assert wsd(50) == 1.0 and wsd(79) == 1.0
    assert wsd(90) == pytest.approx(0.5)
    assert wsd(100) == pytest.approx(0.0)


def test_rewarmup_is_zero_at_switch_and_meets_schedule():
    base = LRSchedule("cosine", total_steps=100, warmup_steps=0, min_lr_ratio=0.0)
    f = rewarmup(base, start=40, steps=10)
    assert f(39) == base(39)
    assert f(40) == 0.0
    assert f(45) == pytest.approx(0.5 * base(50))
    assert f(50) == base(50)
    assert f(80) == base(80)


def test_tanh_phase_in_hits_the_papers_check_values():
    t0, tw = 100, 400
    got = [phase_in("tanh", t0 + k * tw // 4, t0, tw) for k in range(4)]
    assert got == pytest.approx([0.0, 0.5546, 0.8483, 0.9540], abs=5e-5)
    assert phase_in("tanh", t0 + tw, t0, tw) == 1.0
    assert phase_in("tanh", t0 + 10 * tw, t0, tw) == 1.0
    assert phase_in("tanh", t0 - 1, t0, tw) == 0.0


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid", "exp"])
def test_every_phase_in_runs_from_zero_to_exactly_one_monotonically(name):
    vals = [phase_in(name, t, 0, 20) for t in range(0, 25)]
    assert vals[0] == pytest.approx(0.0, abs=1e-12)
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert vals[20:] == [1.0] * 5


def test_phase_in_midpoints():
    assert phase_in("linear", 5, 0, 10) == 0.5
    assert phase_in("cosine", 5, 0, 10) == pytest.approx(0.5)
    assert phase_in("sigmoid", 5, 0, 10) == pytest.approx(0.5)
    assert phase_in("exp", 5, 0, 10) == pytest.approx((1 - math.exp(-2.5)) / (1 - math.exp(-5)))
    assert phase_in("none", 0, 0, 10) == 1.0


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown phase-in schedule 'cubic'; allowed: none, linear, tanh"):
        phase_in("cubic", 0, 0, 10)
    with pytest.raises(ValueError, match="unknown LR schedule 'step'"):
        LRSchedule("step", total_steps=10)
    with pytest.raises(ValueError, match="warmup_steps=20"):
        LRSchedule("cosine", total_steps=10, warmup_steps=20)


def test_resolve_switch_step_values_and_errors():
    from bitflow.schedules import resolve_switch_step

    assert resolve_switch_step(None, 100) is None
    assert resolve_switch_step(0, 100) == 0 and resolve_switch_step(0.0, 100) == 0
    assert resolve_switch_step(0.5, 350) == 175  # round(0.5 * 350)
    assert resolve_switch_step(0.2, 12) == 2  # round(2.4)
    assert resolve_switch_step(40, 100) == 40
    assert resolve_switch_step(0.5, None) is None  # a fraction with an unknown run length
    with pytest.raises(ValueError, match=r"transition\.at=0\.001 of trainer\.max_steps=100 is step 0"):
        resolve_switch_step(0.001, 100)
    with pytest.raises(ValueError, match=r"transition\.at=100 is past the end"):
        resolve_switch_step(100, 100)
    with pytest.raises(ValueError, match=r"transition\.at=1\.5 is outside \(0, 1\)"):
        resolve_switch_step(1.5, 100)
    with pytest.raises(ValueError, match=r"transition\.at=-1 is negative"):
        resolve_switch_step(-1, 100)
    with pytest.raises(ValueError, match=r"transition\.at='half' is not allowed"):
        resolve_switch_step("half", 100)
