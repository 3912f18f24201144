"""LR schedules: named schedulers have the shape users expect, and A1111's schedule string behaves as in
A1111 (modules/textual_inversion/learn_schedule.py)."""

import pytest
import torch

from library.training.optimizers import build_optimizer
from library.registry import SCHEDULER_NAMES, canonical_scheduler_name, scheduler_name_problem
from library.training.schedules import (A1111Schedule, StepRate, a1111_lambda_scheduler, build_scheduler, current_lrs, resolve_warmup_steps)

REFERENCE_TEXT = "0.05:10, 0.02:20, 0.01:60, 0.005:200, 0.002:500, 0.001:3000, 0.0005"


def _sgd(lr=1.0, groups=None):
    groups = groups or [{"params": [torch.nn.Parameter(torch.zeros(2))], "name": "unet"}]
    return torch.optim.SGD(groups, lr=lr)


def _lrs(name, total=100, **kwargs):
    """lr used by each of `total` optimizer steps, for a base lr of 1.0."""
    optimizer = _sgd()
    scheduler = build_scheduler(optimizer, name, total, **kwargs)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


# --- names and warmup ---------------------------------------------------------------------------


def test_scheduler_names():
    for name in SCHEDULER_NAMES:
        assert scheduler_name_problem(name) is None
    assert canonical_scheduler_name("Cosine-With-Restarts") == "cosine_with_restarts"
    assert "did you mean 'cosine'" in scheduler_name_problem("cosin")
    with pytest.raises(ValueError, match="did you mean 'constant_with_warmup'"):
        build_scheduler(_sgd(), "constant_warmup", 10)


def test_warmup_ratio_and_steps():
    assert resolve_warmup_steps(1000) == 0
    assert resolve_warmup_steps(1000, warmup_steps=30) == 30
    assert resolve_warmup_steps(1000, warmup_ratio=0.05) == 50
    assert resolve_warmup_steps(10, warmup_ratio=0.25) == 3  # 2.5 rounds up, not to even
    with pytest.raises(ValueError) as info:
        resolve_warmup_steps(1000, warmup_steps=10, warmup_ratio=0.1)
    assert "optimizer.warmup_steps" in str(info.value) and "optimizer.warmup_ratio" in str(info.value)
    with pytest.raises(ValueError, match="optimizer.warmup_ratio"):
        resolve_warmup_steps(1000, warmup_ratio=1.5)
    with pytest.raises(ValueError, match="optimizer.warmup_steps .*longer than the whole run"):
        resolve_warmup_steps(100, warmup_steps=200)


# --- shapes -------------------------------------------------------------------------------------


def test_constant():
    assert _lrs("constant") == [1.0] * 100


def test_constant_with_warmup_ramps_then_holds():
    lrs = _lrs("constant_with_warmup", warmup_steps=10)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert lrs[10:] == [1.0] * 90


def test_constant_says_it_ignores_warmup(capsys):
    assert _lrs("constant", warmup_steps=10) == [1.0] * 100
    assert "use 'constant_with_warmup'" in capsys.readouterr().out


def test_linear_warms_up_then_decays_to_zero():
    lrs = _lrs("linear", warmup_steps=10)
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5)
    assert lrs[-1] == pytest.approx(1 / 90)


def test_cosine_ends_near_zero():
    lrs = _lrs("cosine")
    assert lrs[0] == pytest.approx(1.0) and lrs[50] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] < 0.001


def test_cosine_with_restarts_goes_back_up():
    lrs = _lrs("cosine_with_restarts", num_cycles=2)
    assert lrs[49] < 0.01 and lrs[50] == pytest.approx(1.0)
    assert lrs[-1] < 0.01
    assert lrs[25] == pytest.approx(lrs[75])


def test_polynomial_power():
    lrs = _lrs("polynomial", power=2.0)
    assert lrs[50] == pytest.approx(0.25, abs=1e-6)  # linear would be 0.5
    assert lrs[-1] == pytest.approx(1e-4, abs=1e-6)
    assert _lrs("polynomial")[50] == pytest.approx(0.5, abs=1e-6)


def test_settings_a_scheduler_ignores_are_reported(capsys):
    _lrs("cosine", num_cycles=3)
    assert "num_cycles=3 only applies to 'cosine_with_restarts'" in capsys.readouterr().out


def test_bad_lengths():
    with pytest.raises(ValueError, match="at least 1 training step"):
        build_scheduler(_sgd(), "linear", 0)
    with pytest.raises(ValueError, match="optimizer.warmup_steps"):
        build_scheduler(_sgd(), "linear", 10, warmup_steps=20)


# --- Adafactor relative step and effective lrs ---------------------------------------------------


def test_relative_step_uses_adafactors_own_lr(capsys):
    from transformers.optimization import AdafactorSchedule

    param = torch.nn.Parameter(torch.ones(4))
    optimizer = build_optimizer("Adafactor", [{"params": [param], "name": "unet"}], None,
                                {"relative_step": True, "warmup_init": True})
    scheduler = build_scheduler(optimizer, "cosine", 100, warmup_steps=5, relative_step=True)
    out = capsys.readouterr().out
    assert isinstance(scheduler, AdafactorSchedule)
    assert out.count("\n") == 1 and "'cosine' and 5 warmup steps ignored" in out
    lrs = []
    for _ in range(3):
        param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
        lrs.append(current_lrs(scheduler, optimizer)["unet"])
    # warmup_init: lr = 1e-6 * step (no scale_parameter); after step k, the rate step k + 1 will use (the trainer
    # asks before each step, as it does the schedulers)
    assert lrs == pytest.approx([2e-6, 3e-6, 4e-6])


def test_current_lrs_names_groups_and_follows_the_scheduler():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "name": "unet", "lr": 1e-4},
              {"params": [torch.nn.Parameter(torch.zeros(2))], "name": "text_encoder", "lr": 5e-5},
              {"params": [torch.nn.Parameter(torch.zeros(2))]}]
    optimizer = _sgd(1e-3, groups)
    scheduler = build_scheduler(optimizer, "linear", 10, warmup_steps=2)
    optimizer.step()
    scheduler.step()
    assert current_lrs(scheduler, optimizer) == pytest.approx({"unet": 5e-5, "text_encoder": 2.5e-5, "group2": 5e-4})


def test_current_lrs_reports_d_times_lr_for_dadaptation():
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = build_optimizer("DAdaptAdam", [{"params": [param], "name": "unet"}], 0.5, {})
    scheduler = build_scheduler(optimizer, "constant", 10)
    for _ in range(3):
        param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
    d = optimizer.param_groups[0]["d"]
    assert d != 1.0
    assert current_lrs(scheduler, optimizer)["unet"] == pytest.approx(0.5 * d)


# --- A1111 schedule string -------------------------------------------------------------------------


def _pairs(schedule):
    return [(s.rate, s.end_step) for s in schedule.steps]


@pytest.mark.parametrize(
    "text, max_steps, start, expected, last_step, ignored",
    [
        # The REFERENCE example: the trailing bare rate can never apply, as 0.001 already runs to 3000.
        (REFERENCE_TEXT, 3000, 0,
         [(0.05, 10), (0.02, 20), (0.01, 60), (0.005, 200), (0.002, 500), (0.001, 3000)], 3000, ("0.0005",)),
        # Capped at max_steps 100: 0.005 runs to 100 and parsing ends there.
        (REFERENCE_TEXT, 100, 0,
         [(0.05, 10), (0.02, 20), (0.01, 60), (0.005, 100)], 100, ("0.002:500", "0.001:3000", "0.0005")),
        # A single bare number is a constant rate.
        ("0.005", 500, 0, [(0.005, 500)], 500, ()),
        # A bare rate runs to max_steps and ends parsing.
        ("0.05:10, 0.005, 0.001:400", 500, 0, [(0.05, 10), (0.005, 500)], 500, ("0.001:400",)),
        # -1 as the step means "until max steps" in A1111.
        ("0.05:10, 0.01:-1", 500, 0, [(0.05, 10), (0.01, 500)], 500, ()),
        # A step beyond max steps is capped and ends parsing.
        ("0.05:10, 0.01:5000, 0.001", 1000, 0, [(0.05, 10), (0.01, 1000)], 1000, ("0.001",)),
        # Last explicit step below max steps: training ends there.
        ("0.05:10, 0.01:200", 3000, 0, [(0.05, 10), (0.01, 200)], 200, ()),
        # Resume mid-entry: passed entries are skipped.
        (REFERENCE_TEXT, 3000, 15, [(0.02, 20), (0.01, 60), (0.005, 200), (0.002, 500), (0.001, 3000)], 3000, ("0.0005",)),
        # Resume exactly at an entry's step: that entry is passed too (A1111 keeps only step > cur_step).
        (REFERENCE_TEXT, 3000, 20, [(0.01, 60), (0.005, 200), (0.002, 500), (0.001, 3000)], 3000, ("0.0005",)),
        # Resume beyond every explicit step: the bare tail rate remains.
        ("0.05:10, 0.001", 300, 100, [(0.001, 300)], 300, ()),
        # Whitespace around numbers is fine, as with A1111's float()/int().
        (" 0.05 : 10 ,0.01 ", 100, 0, [(0.05, 10), (0.01, 100)], 100, ()),
    ],
)
def test_a1111_schedule_table(text, max_steps, start, expected, last_step, ignored):
    schedule = A1111Schedule(text, max_steps, start_step=start)
    assert _pairs(schedule) == expected
    assert schedule.last_step == last_step
    assert schedule.ignored == ignored
    assert all(isinstance(s, StepRate) for s in schedule.steps)


def test_a1111_rate_switches_at_the_step_itself():
    schedule = A1111Schedule(REFERENCE_TEXT, 3000)
    # A1111 keeps a rate while step_number < end_step and moves on at end_step.
    assert [schedule.rate_at(s) for s in (0, 9, 10, 19, 20, 2999)] == [0.05, 0.05, 0.02, 0.02, 0.01, 0.001]
    assert schedule.rate_at(3000) == 0.001  # after the end: kept at the final rate


@pytest.mark.parametrize(
    "text, bad_piece",
    [
        ("0.05:abc", "0.05:abc"),
        ("abc", "abc"),
        ("0.05:10, abc, 0.01", "abc"),
        ("0.01:10:5", "0.01:10:5"),
        ("-0.01:10", "-0.01:10"),
        ("0.05:10, -0.001", "-0.001"),
        ("0.05:1e2", "0.05:1e2"),
        ("0.05:10.5", "0.05:10.5"),
        ("0.05:-5", "0.05:-5"),
        ("nan", "nan"),
        ("0.05:", "0.05:"),
        ("0.05:20, 0.01:10", "0.01:10"),
        ("0.005, oops", "oops"),  # after the end, but still a typo worth reporting
    ],
)
def test_a1111_malformed_pieces_are_named(text, bad_piece):
    with pytest.raises(ValueError) as info:
        A1111Schedule(text, 1000)
    assert repr(bad_piece) in str(info.value)


@pytest.mark.parametrize("text", ["0.05:10,,0.01", "0.05:10, 0.01:20,", ""])
def test_a1111_empty_pieces(text):
    with pytest.raises(ValueError, match="empty"):
        A1111Schedule(text, 1000)


def test_a1111_resume_after_the_end_has_nothing_to_train():
    with pytest.raises(ValueError, match="ends at step 200; the run is already at step 200"):
        A1111Schedule("0.05:10, 0.01:200", 3000, start_step=200)


def test_a1111_scheduler_sets_absolute_rates():
    optimizer = _sgd(lr=1e-4)  # the configured lr is replaced by the schedule's rates
    schedule = A1111Schedule("0.05:3, 0.01:5, 0.002", 8)
    scheduler = a1111_lambda_scheduler(optimizer, schedule)
    seen = []
    for _ in range(schedule.last_step):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.05, 0.05, 0.05, 0.01, 0.01, 0.002, 0.002, 0.002])
    assert current_lrs(scheduler, optimizer) == {"unet": pytest.approx(0.002)}


def test_a1111_scheduler_resumes_mid_schedule_for_every_group():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3},
              {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 5e-4}]
    optimizer = _sgd(groups=groups)
    scheduler = a1111_lambda_scheduler(optimizer, A1111Schedule(REFERENCE_TEXT, 3000, start_step=15))
    assert scheduler.last_epoch == 15
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02, 0.02])
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.01])
