"""Learning-rate schedules: diffusers' named schedulers, Adafactor's own lr, and A1111's
"rate:step, rate:step, rate" string used by textual inversion.

Step convention everywhere: `step` is the number of optimizer steps already taken (0 before the first
one). A scheduler's lr at step s is the lr the (s+1)-th optimizer step uses, and the trainer calls
scheduler.step() after every optimizer.step().
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from library.quiet import silenced
from library.registry import canonical_scheduler_name

def resolve_warmup_steps(total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """Warmup length in steps: `warmup_steps`, or `warmup_ratio` of `total_steps` rounded half up."""
    if warmup_steps and warmup_ratio:
        raise ValueError(
            f"optimizer.warmup_steps ({warmup_steps}) and optimizer.warmup_ratio ({warmup_ratio}) are both set; keep one"
        )
    if warmup_steps < 0:
        raise ValueError(f"optimizer.warmup_steps must be 0 or more, got {warmup_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"optimizer.warmup_ratio must be between 0 and 1, got {warmup_ratio}")
    if warmup_ratio:
        return int(math.floor(warmup_ratio * total_steps + 0.5))
    if warmup_steps > total_steps:
        raise ValueError(f"optimizer.warmup_steps ({warmup_steps}) is longer than the whole run ({total_steps} steps)")
    return int(warmup_steps)


def _adafactor_schedule(optimizer: torch.optim.Optimizer) -> LRScheduler:
    with silenced():  # transformers.optimization imports peft -> bitsandbytes, which prints a banner
        module = importlib.import_module("transformers.optimization")
    return module.AdafactorSchedule(optimizer)


def _note_ignored_settings(name: str, warmup_steps: int, num_cycles: int, power: float) -> None:
    """One line per setting the chosen scheduler would silently ignore."""
    if name == "constant" and warmup_steps:
        print(f"note: lr scheduler 'constant' ignores warmup ({warmup_steps} steps); use 'constant_with_warmup'")
    if name != "cosine_with_restarts" and num_cycles != 1:
        print(f"note: num_cycles={num_cycles} only applies to 'cosine_with_restarts'; '{name}' ignores it")
    if name != "polynomial" and power != 1.0:
        print(f"note: power={power:g} only applies to 'polynomial'; '{name}' ignores it")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    total_steps: int,
    warmup_steps: int = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    relative_step: bool = False,
) -> LRScheduler:
    """The named scheduler via diffusers.optimization.get_scheduler.

    relative_step=True (Adafactor computing its own lr) returns transformers' AdafactorSchedule, which
    only mirrors the optimizer's lr, and prints one line if another scheduler or a warmup was asked for.
    """
    canonical = canonical_scheduler_name(name)
    if total_steps < 1:
        raise ValueError(f"lr scheduler needs at least 1 training step, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"optimizer.warmup_steps must be between 0 and {total_steps} (the run length), got {warmup_steps}")
    if num_cycles < 1:
        raise ValueError(f"num_cycles must be 1 or more, got {num_cycles}")
    if relative_step:
        if canonical != "constant" or warmup_steps:
            print(f"note: Adafactor with relative_step=True computes its own lr; lr scheduler '{canonical}'"
                  f"{f' and {warmup_steps} warmup steps' if warmup_steps else ''} ignored")
        return _adafactor_schedule(optimizer)
    _note_ignored_settings(canonical, warmup_steps, num_cycles, power)
    from diffusers.optimization import get_scheduler  # slow import; config validation never needs it

    try:
        return get_scheduler(canonical, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                             num_cycles=num_cycles, power=power)
    except ValueError as exc:  # e.g. polynomial refuses an lr below its 1e-7 end value
        raise ValueError(f"lr scheduler '{canonical}': {exc}") from exc


def _adafactor_lr(optimizer: torch.optim.Optimizer, group: dict) -> float:
    """The lr Adafactor (relative_step) will use on its next step: it counts the step before computing it, and
    scales by the parameter's RMS (with scale_parameter)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it: ask the real Adafactor
    param = group["params"][0]
    state = optimizer.state.get(param, {})
    rms = float(param.detach().float().norm(2) / math.sqrt(param.numel()))
    return float(type(optimizer)._get_lr(group, {"step": state.get("step", 0) + 1, "RMS": rms}))


def current_lrs(scheduler: LRScheduler | None, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Effective lr per param group (keyed by group["name"], else "group<i>") that the next optimizer step uses.

    Plain groups report the scheduler's last lr; D-Adaptation/Prodigy groups report d*lr (the step size
    they really take); Adafactor with relative_step reports the lr it computes itself.
    """
    last = scheduler.get_last_lr() if scheduler is not None else []
    result: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        key = str(group.get("name", f"group{i}"))
        if key in result:
            key = f"{key}_{i}"
        if group.get("relative_step"):
            result[key] = _adafactor_lr(optimizer, group)
            continue
        lr = float(last[i]) if len(last) == len(optimizer.param_groups) else float(group["lr"])
        result[key] = lr * float(group["d"]) if "d" in group else lr
    return result


# ---------------------------------------------------------------------------------------------------
# A1111 "rate:step, ..." schedule (stable-diffusion-webui modules/textual_inversion/learn_schedule.py)


@dataclass(frozen=True)
class StepRate:
    """`rate` applies while step < end_step."""

    rate: float
    end_step: int


def _parse_piece(piece: str, text: str) -> tuple[float, int | None]:
    """'0.005' -> (0.005, None); '0.005:200' -> (0.005, 200). ValueError names the piece verbatim."""
    where = f"learning-rate schedule {text!r}"
    piece = piece.strip()
    if not piece:
        raise ValueError(f"{where}: empty entry (two commas in a row, or a comma at the end)")
    parts = piece.split(":")
    # A1111 quietly reads "0.01:10:5" as a bare 0.01; that is almost surely a typo, so refuse it.
    if len(parts) > 2:
        raise ValueError(f"{where}: bad entry {piece!r}; write rate:step, e.g. 0.005:200")
    try:
        rate = float(parts[0])
    except ValueError:
        raise ValueError(f"{where}: bad rate in {piece!r}; write rate:step, e.g. 0.005:200") from None
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"{where}: rate in {piece!r} must be a finite number, 0 or more")
    if len(parts) == 1:
        return rate, None
    try:
        step = int(parts[1])  # int(), as A1111 does: "200" and " 200" pass, "2e2" and "200.0" do not
    except ValueError:
        raise ValueError(f"{where}: bad step in {piece!r}; the step must be a whole number") from None
    if step < -1:  # A1111 reads -1 as "until max steps"; other negatives mean nothing there
        raise ValueError(f"{where}: step in {piece!r} must be 0 or more (or -1 for 'until the end')")
    return rate, step


class A1111Schedule:
    """Parsed A1111 learning-rate schedule, e.g. "0.05:10, 0.02:20, 0.005".

    Semantics, confirmed against A1111's LearnScheduleIterator/LearnRateScheduler:
    - "rate:step" applies while step < that step (A1111 switches once `step_number >= end_step`);
    - a bare rate, or step -1, applies until max_steps and ends parsing;
    - a step above max_steps is capped to max_steps and ends parsing; a step equal to max_steps ends the
      useful part too (A1111 keeps parsing but can never reach later entries), so what follows is ignored;
    - training ends at the last entry's step (A1111 marks the scheduler finished there), even below max_steps;
    - on resume (start_step), entries whose step <= start_step are skipped (A1111: `if step > cur_step`).
    Stricter than A1111 (which crashes or misbehaves instead): malformed pieces, negative rates and
    explicit steps that do not increase raise ValueError naming the piece; so does a resumed run with
    nothing left to train. Pieces after the end are still checked for typos and listed in `ignored`.
    """

    def __init__(self, text: str, max_steps: int, start_step: int = 0) -> None:
        if max_steps < 1:
            raise ValueError(f"learning-rate schedule needs max_steps of 1 or more, got {max_steps}")
        if start_step < 0:
            raise ValueError(f"learning-rate schedule start step must be 0 or more, got {start_step}")
        self.text, self.max_steps, self.start_step = text, max_steps, start_step
        if not str(text).strip():
            raise ValueError("learning-rate schedule is empty; give a rate like 0.005, or 0.05:100, 0.005")
        parsed = [(piece.strip(), *_parse_piece(piece, text)) for piece in str(text).split(",")]
        entries, ignored = self._entries(parsed)
        # Skip what a resumed run has passed; bare/-1 entries end at max_steps, as in A1111.
        self.steps: list[StepRate] = [StepRate(rate, end) for rate, end in entries if end > start_step]
        self.ignored: tuple[str, ...] = tuple(ignored)
        if not self.steps:
            end = entries[-1][1]
            raise ValueError(f"learning-rate schedule {text!r} ends at step {end}; "
                             f"the run is already at step {start_step}, so nothing is left to train")
        self.last_step: int = self.steps[-1].end_step

    def _entries(self, parsed: list[tuple[str, float, int | None]]) -> tuple[list[tuple[float, int]], list[str]]:
        entries: list[tuple[float, int]] = []
        ignored: list[str] = []
        previous: tuple[str, int] | None = None
        for piece, rate, step in parsed:
            if entries and entries[-1][1] == self.max_steps:  # parsing has ended
                ignored.append(piece)
                continue
            if step is None or step == -1:
                entries.append((rate, self.max_steps))
                continue
            if previous is not None and step <= previous[1]:
                raise ValueError(f"learning-rate schedule {self.text!r}: step in {piece!r} must be after "
                                 f"the step in {previous[0]!r}; steps must increase")
            previous = (piece, step)
            entries.append((rate, min(step, self.max_steps)))
        return entries, ignored

    def rate_at(self, step: int) -> float:
        """The rate for the optimizer step taken after `step` steps. Before start_step the first rate
        applies, from last_step on the final one (the trainer stops there; this only keeps the
        scheduler's post-final step() well defined)."""
        for entry in self.steps:
            if step < entry.end_step:
                return entry.rate
        return self.steps[-1].rate

    def __repr__(self) -> str:
        return f"A1111Schedule({self.text!r}, max_steps={self.max_steps}, start_step={self.start_step})"


def a1111_lambda_scheduler(optimizer: torch.optim.Optimizer, schedule: A1111Schedule) -> LambdaLR:
    """A LambdaLR that sets every group's lr to the schedule's absolute rate, like A1111 does.

    The groups' configured lrs are replaced (base lr 1.0 times the rate). The scheduler's last_epoch is
    the global step, starting at schedule.start_step, so a resumed run continues mid-schedule.
    """
    for group in optimizer.param_groups:
        group["lr"] = 1.0
        group["initial_lr"] = 1.0  # LambdaLR multiplies this; also required when last_epoch >= 0
    return LambdaLR(optimizer, lambda step: schedule.rate_at(step), last_epoch=schedule.start_step - 1)
