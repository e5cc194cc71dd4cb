"""A run's length as wall time (training/budget.py, `fgpt train --time_budget`): the
duration's parsing, the warmup-stable-decay schedule, the step at which a budget fixes
the run's length, and whole runs: on time, recorded, replayed step for step by
--max_steps, resumed on the same schedule."""

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

from functional_gpt.errors import UserError
from functional_gpt.training.budget import budget_seconds, expected_steps, plan_steps
from functional_gpt.training.loop import train
from functional_gpt.training.optim import cooldown_start, lr_at
from functional_gpt.training.settings import make_config, resume_config

from test_train import quiet_train, run_config, setup  # noqa: F401 (setup is a fixture)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1.5h", 5400), ("2 min", 120), (" 5m ", 300),
                                           ("0.5s", 0.5)])
def test_durations(text, seconds):
    assert budget_seconds(text) == seconds


@pytest.mark.parametrize("text, message", [
    ("0", r"^--time_budget must be a positive duration, got '0'$"),
    ("0m", r"^--time_budget must be a positive duration, got '0m'$"),
    ("-5m", r"^--time_budget must be a positive duration, got '-5m'$"),
    ("10x", r"^--time_budget '10x': unknown unit 'x'; use s, m \(or min\) or h$"),
    ("10 days", r"^--time_budget '10 days': unknown unit 'days'"),
    ("600", r"^--time_budget '600': give a unit, as in 600s$"),
    ("soon", r"^--time_budget 'soon': expected a duration such as 90s, 10m or 1.5h$"),
    ("", r"^--time_budget '': expected a duration"),
    ("1e308h", r"^--time_budget must be a finite duration"),
    ("nan", r"^--time_budget 'nan': expected a duration"),
])
def test_bad_durations_are_one_line_naming_the_flag(text, message):
    with pytest.raises(UserError, match=message):
        budget_seconds(text)


def test_wsd_warms_up_holds_then_decays_linearly_to_the_floor():
    """warm-up 2, length 12, cooldown 0.25: the last 3 updates (9, 10, 11) decay, the
    last one at min_lr; a cosine of the same settings is never flat."""
    kw = dict(lr=1.0, warmup_steps=2, decay_steps=12, min_lr=0.1, schedule="wsd", cooldown=0.25)
    assert [lr_at(s, **kw) for s in range(13)] == pytest.approx(
        [0.5, 1.0] + [1.0] * 7 + [0.7, 0.4, 0.1, 0.1])
    assert cooldown_start(12, 0.25) == 9
    # however short the run, its last update decays (round(0.25 * 2) is 0: one step of decay, not none)
    assert lr_at(1, **kw | {"warmup_steps": 0, "decay_steps": 2}) == pytest.approx(0.1)
    cosine = [lr_at(s, **kw | {"schedule": "cosine"}) for s in range(2, 12)]
    assert all(a > b for a, b in zip(cosine, cosine[1:]))


@settings(max_examples=300, deadline=None)
@given(done=st.integers(1, 10**6), pace=st.floats(1e-4, 1e3), budget=st.floats(1.0, 1e6),
       cooldown=st.floats(0.01, 0.99))
def test_a_planned_length_starts_its_cooldown_at_the_step_it_is_fixed(done, pace, budget, cooldown):
    """Whatever the pace, budget and cooldown: a plan is made exactly when the expected
    length's cooldown is due, and the length it fixes has its cooldown start at this very
    step (so --max_steps N replays it), at or above the expected length."""
    spent = done * pace
    planned, expected = plan_steps(done, spent, budget, cooldown), expected_steps(done, spent, budget)
    if done < cooldown_start(expected, cooldown):
        assert planned is None
    else:
        assert planned is not None and cooldown_start(planned, cooldown) == done and planned >= expected > done


def test_no_plan_before_the_first_step():
    assert plan_steps(0, 0.0, 60.0, 0.25) is None and expected_steps(0, 0.0, 60.0) is None


@pytest.mark.parametrize("flags, message", [
    (dict(time_budget="0"), r"^--time_budget must be a positive duration, got '0'$"),
    (dict(time_budget="-1m"), r"^--time_budget must be a positive duration, got '-1m'$"),
    (dict(time_budget="3parsecs"), r"^--time_budget '3parsecs': unknown unit 'parsecs'"),
    (dict(time_budget="10m", max_steps=100),
     r"^--max_steps 100 and --time_budget 10m both set the run's length: give one \(a budget run records"),
    (dict(time_budget="10m", decay_steps=100, max_steps=None),
     r"^--decay_steps 100 does not go with --time_budget 10m: under a budget, where the decay ends is fixed"),
    (dict(optimizer="sgd"), r"^--optimizer: expected one of 'adamw', 'muon', got 'sgd'"),
    (dict(schedule="linear"), r"^--schedule: expected one of 'cosine', 'wsd', got 'linear'"),
    (dict(cooldown=1.0), r"^--cooldown: expected a finite number in \(0, 1\), got 1.0"),
    (dict(cooldown=0), r"^--cooldown: expected a finite number in \(0, 1\), got 0"),
    (dict(optimizer="muon", lora_rank=4), r"^--optimizer muon trains the full model's block matrices; a LoRA"),
])
def test_bad_budget_schedule_and_optimizer_flags_are_one_line(setup, tmp_path, flags, message):
    values = dict(data="d", out=str(tmp_path / "run"), init="w.safetensors", max_steps=None) | flags
    with pytest.raises(UserError, match=message):
        make_config(values)


def budget_config(setup, out, budget="4s", eval_interval=5, **overrides):
    """A Muon + wsd budget run of the tiny model, evaluated every 5 steps."""
    return run_config(setup, out, max_steps=None, time_budget=budget, optimizer="muon", schedule="wsd", dropout=0.1,
                      eval_interval=eval_interval, sample_tokens=0, **overrides)


def test_a_budget_run_ends_on_time_records_its_steps_and_replays_with_max_steps(setup, tmp_path):
    """A 4 s run: its steps, evaluations and checkpoints fit in the budget (its final
    evaluation comes after), state.json holds the time spent and the steps the cooldown
    fixed, and the same flags with --max_steps <those steps> give the same weights and
    moments bit for bit."""
    logs = []
    summary = train(budget_config(setup, tmp_path / "budget"), progress=False, log=logs.append)
    state = json.loads((tmp_path / "budget" / "state.json").read_text())
    steps = state["planned_steps"]
    assert summary["step"] == state["step"] == steps > 20
    assert 3.0 < state["time_spent"] <= summary["budget_seconds_spent"] < 4.0 * 1.15
    assert f"time budget 4s: {steps} steps in" in logs[-1] and f"--max_steps {steps}" in logs[-1]
    lrs = [m["lr"] for m in map(json.loads, (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines())
           if "lr" in m]
    assert lrs == pytest.approx([lr_at(s, lr=1e-2, warmup_steps=2, decay_steps=steps, min_lr=1e-3, schedule="wsd")
                                 for s in range(steps)])
    quiet_train(run_config(setup, tmp_path / "replay", max_steps=steps, optimizer="muon", schedule="wsd",
                           dropout=0.1, eval_interval=5, sample_tokens=0))
    for name in ("model.safetensors", "optimizer.safetensors"):
        budget, replay = (load_file(tmp_path / run / name) for run in ("budget", "replay"))
        assert budget.keys() == replay.keys() and all(torch.equal(budget[k], replay[k]) for k in budget), name
    moments = load_file(tmp_path / "budget" / "optimizer.safetensors")
    assert "exp_avg.h.0.mlp.c_fc.weight" in moments and "exp_avg_sq.h.0.mlp.c_fc.weight" not in moments
    assert "exp_avg_sq.h.0.ln_1.weight" in moments


def test_a_budget_run_resumes_its_clock_and_its_planned_length(setup, tmp_path, monkeypatch):
    """Stopped by a signal before its cooldown, a budget run resumes with the time it had
    spent, fixes its length on the same rule and ends within the budget overall; once
    finished, a resume is refused in one line."""
    import functional_gpt.training.loop as loop

    run = tmp_path / "run"
    steps_seen = []
    original = loop.train_step

    def stop_after_ten(state, batch, settings):
        after, metrics = original(state, batch, settings)
        steps_seen.append(after.step)
        if after.step == 10:
            monkeypatch.setattr(loop._StopOnSignal, "requested", "SIGTERM")  # as a signal sets it
        return after, metrics

    monkeypatch.setattr(loop, "train_step", stop_after_ten)
    first = quiet_train(budget_config(setup, run, budget="6s"))
    monkeypatch.setattr(loop, "train_step", original)
    monkeypatch.setattr(loop._StopOnSignal, "requested", None)
    state = json.loads((run / "state.json").read_text())
    assert first["interrupted"] and state["step"] == 10 and state["planned_steps"] is None
    assert 0 < state["time_spent"] < 3.0
    spent_before = state["time_spent"]
    second = quiet_train(resume_config(run, {}), resume=True)
    assert second["budget_seconds_spent"] >= spent_before + second["train_seconds"]  # the clock went on
    state = json.loads((run / "state.json").read_text())
    assert second["step"] == state["planned_steps"] == state["step"] > 10
    assert state["time_spent"] < 6.0 * 1.15
    with pytest.raises(UserError, match=r"has trained its --time_budget 6s \(\d+ steps\); train on from it into a new "
                                        r"run: --init .* --out DIR$"):
        quiet_train(resume_config(run, {}), resume=True)


@pytest.mark.parametrize("field, value, message", [
    ("time_spent", -1.0, r"field 'time_spent' must be a number >= 0 in a time-budget run, got -1.0"),
    ("planned_steps", 0, r"field 'planned_steps' must be null or an integer >= 1 in a time-budget run, got 0"),
    ("time_spent", ..., r"field 'time_spent' must be a number >= 0 in a time-budget run, got 'nothing'"),
])
def test_a_budget_runs_garbled_clock_is_one_line(setup, tmp_path, field, value, message):
    run = tmp_path / "run"
    quiet_train(budget_config(setup, run, budget="1s"))
    path = run / "state.json"
    state = json.loads(path.read_text())
    if value is ...:
        del state[field]
    else:
        state[field] = value
    path.write_text(json.dumps(state))
    with pytest.raises(UserError, match=message):
        quiet_train(resume_config(run, {}), resume=True)


def test_a_budget_holds_back_the_time_of_its_last_and_final_evaluations(setup, tmp_path, monkeypatch):
    """Evaluations made slow (0.1 s per window: 0.4 s for the periodic 4, about 2 s for
    the final one over every window of val.bin): the run, final evaluation included,
    still ends within its 5 s, because the steps are fixed with that time held back."""
    import time

    import functional_gpt.training.loop as loop

    original = loop.val_loss

    def slow(params, config, tokens, starts, *args, **kwargs):
        time.sleep(0.1 * len(starts))
        return original(params, config, tokens, starts, *args, **kwargs)

    monkeypatch.setattr(loop, "val_loss", slow)
    summary = quiet_train(budget_config(setup, tmp_path / "run", budget="5s", eval_interval=3))
    assert summary["budget_seconds_spent"] < 5.0 * 1.08
