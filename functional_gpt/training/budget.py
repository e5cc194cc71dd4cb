"""A run's length as wall time (`fgpt train --time_budget 10m`).

The schedule stays a function of the step (optim.lr_at, "wsd"): warm-up, then constant,
then a linear cooldown over the last fraction of the run. Under a budget the one unknown
is the run's length in steps. Until the cooldown is due it does not change the learning
rate, so it is estimated from the pace so far; at the first step where the cooldown is
due it is fixed (`plan_steps`) to the length whose cooldown starts at that very step. The
run then takes exactly the schedule `--max_steps <that length>` takes, and replays with it.
"""

import re

from ..errors import UserError
from .optim import cooldown_start

_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600}
_BUDGET = re.compile(r"(?P<number>[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)(?P<unit>[^\d.]*)")


def budget_seconds(text: str, flag: str = "--time_budget") -> float:
    """"90s", "10m", "1.5h" -> seconds (> 0); anything else is a UserError naming `flag`."""
    if not isinstance(text, str):
        raise UserError(f"{flag}: expected a duration such as 90s, 10m or 1.5h, got {text!r:.40}")
    match = _BUDGET.fullmatch(text.strip())
    if match is None:
        raise UserError(f"{flag} {text!r:.40}: expected a duration such as 90s, 10m or 1.5h")
    number, unit = float(match["number"]), match["unit"].strip()
    if not 0 < number < float("inf"):
        raise UserError(f"{flag} must be a positive duration, got {text!r:.40}")
    if not unit:
        raise UserError(f"{flag} {text!r:.40}: give a unit, as in {match['number']}s")
    if unit not in _UNITS:
        raise UserError(f"{flag} {text!r:.40}: unknown unit {unit!r:.20}; use s, m (or min) or h")
    seconds = number * _UNITS[unit]
    if seconds == float("inf"):
        raise UserError(f"{flag} must be a finite duration, got {text!r:.40}")
    return seconds


def expected_steps(done: int, spent: float, budget: float) -> int | None:
    """How many steps the budget holds at the pace so far (None before the first step)."""
    if done == 0 or spent <= 0:
        return None
    return max(done + 1, int(done * budget / spent))


def plan_steps(done: int, spent: float, budget: float, cooldown: float) -> int | None:
    """The run's length in steps, fixed once the cooldown is due: after `done` steps in
    `spent` of `budget` seconds, if the expected length's cooldown starts at or before
    this step, -> the least length N from it on with cooldown_start(N, cooldown) == done; else
    None (not yet due)."""
    expected = expected_steps(done, spent, budget)
    if expected is None or done < cooldown_start(expected, cooldown):
        return None
    n = expected
    while cooldown_start(n, cooldown) < done:  # the pace dropped past the start: run a little over
        n += 1  # each step moves the start by 0 or 1 (cooldown < 1), so this stops at == done
    return n
