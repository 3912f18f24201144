"""bench_scripts.py --profile: where one training step's time goes (torch.profiler, CPU activities).

The profiled window is the run's last step, as the benchmark defines a step: from the end of the step before
it (its optimizer step) to the end of its own optimizer step. The last, so that stopping the profiler and
reading its events slows no step that is timed. For that window only, hooks mark regions with record_function ranges: the UNet's and each
text encoder's forward, and every peft LoRA layer with its base layer inside it. Every profiled op then gets
a group from the innermost region around it:

- forward ops: "UNet forward" / "text encoder forward"; inside a LoRA layer but outside its base layer:
  "LoRA layer ops" (peft's dropout, casts, the two small matmuls, scaling and the add);
- backward ops: the group of the forward op that created their autograd node (the profiler's sequence
  numbers link them), with "backward" for "forward"; gradient accumulation into .grad: "AccumulateGrad";
- "optimizer" (Optimizer.step / zero_grad ranges); everything else: "other ops" (noise, loss, casts, .item(),
  gradient clipping, the scheduler, logging), and "Python outside ops" = the window minus the time inside any
  op (the loop's own Python, tqdm, TensorBoard, data).

Times are self times on the thread that runs the loop (ops' time minus the time of ops nested in them).
"""
from __future__ import annotations

import time
from collections import defaultdict

UNET, TE, LORA, BASE = "kiln::unet_forward", "kiln::te_forward", "kiln::lora_layer", "kiln::lora_base"


class _Ranges:
    """record_function ranges opened and closed by module hooks."""

    def __init__(self):
        self.handles: list = []

    def mark(self, module, name: str) -> None:
        from torch.autograd.profiler import record_function

        open_ranges: list = []

        def enter(*_):
            r = record_function(name)
            r.__enter__()
            open_ranges.append(r)

        def leave(*_):
            if open_ranges:
                open_ranges.pop().__exit__(None, None, None)

        self.handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class StepProfiler:
    """Profiles the last step of the run that `capture` watches (bench_scripts_child.Capture)."""

    def __init__(self, capture):
        self.capture = capture
        self.step: int | None = None  # the profiled step, once the run's length is known
        self.profiler = None
        self.ranges = _Ranges()
        self.window_s = 0.0
        self._start = 0.0
        capture.on_step.append(self._on_step)

    def _on_step(self, step: int) -> None:
        from bench_scripts_child import run_view

        if self.step is None:
            self.step = run_view(self.capture.trainer).total_steps
        if step == self.step - 1:
            self._begin()
        elif step == self.step and self.profiler is not None:
            self.profiler.stop()
            self.window_s = time.perf_counter() - self._start
            self.ranges.remove()

    def _begin(self) -> None:
        from peft.tuners.lora import LoraLayer
        from torch.profiler import ProfilerActivity, profile

        from bench_scripts_child import run_view

        parts = run_view(self.capture.trainer).parts
        self.ranges.mark(parts.unet, UNET)
        for encoder in parts.text_encoders:
            self.ranges.mark(encoder, TE)
        for model in (parts.unet, *parts.text_encoders):
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    self.ranges.mark(module, LORA)
                    self.ranges.mark(module.base_layer, BASE)
        self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
        self.profiler.start()
        self._start = time.perf_counter()

    def summary(self) -> dict | None:
        """The profile's groups (read after the run: reading the events takes seconds)."""
        if self.profiler is None or not self.window_s:
            return None
        result = summarize(self.profiler.events(), self.window_s)
        return {**result, "step": self.step}


def _nest(events: list) -> list[tuple]:
    """(event, parent index, self µs) in start order, nested by time on the loop's thread. Built here rather
    than read from the profiler's tree, which leaves out ranges the window cut (the optimizer step whose
    post-hook stopped the profiler)."""
    thread = max({e.thread for e in events}, key=lambda t: sum(1 for e in events if e.thread == t))
    ordered = sorted((e for e in events if e.thread == thread), key=lambda e: (e.time_range.start, -e.time_range.end))
    nested, stack = [], []
    child_time = defaultdict(float)
    for index, event in enumerate(ordered):
        while stack and ordered[stack[-1]].time_range.end < event.time_range.end:
            stack.pop()
        parent = stack[-1] if stack else None
        if parent is not None:
            child_time[parent] += event.time_range.elapsed_us()
        nested.append([event, parent])
        stack.append(index)
    return [(e, p, max(e.time_range.elapsed_us() - child_time[i], 0.0)) for i, (e, p) in enumerate(nested)]


def _own_group(event, forward_groups: dict) -> str | None:
    name = event.name
    if name == UNET:
        return "UNet forward"
    if name == TE:
        return "text encoder forward"
    if name == LORA:
        return "LoRA layer ops forward"
    if name.startswith(("Optimizer.step#", "Optimizer.zero_grad#")):
        return "optimizer"
    if "AccumulateGrad" in name:
        return "AccumulateGrad"
    if name.startswith("autograd::engine::evaluate_function"):
        group = forward_groups.get(event.sequence_nr, "other ops")
        return group.replace("forward", "backward") if group != "other ops" else "other backward"
    return None


def summarize(events, window_s: float) -> dict:
    """Self time per group (ms) and each group's top ops."""
    nested = _nest(list(events))
    groups: list[str] = []
    forward_groups: dict[int, str] = {}  # sequence number → group of the forward op (it runs before its backward)
    for event, parent, _ in nested:
        own = _own_group(event, forward_groups)
        if event.name == BASE:  # the base layer's ops belong to the model around the LoRA layer
            index = parent
            while index is not None and nested[index][0].name in (LORA, BASE):
                index = nested[index][1]
            own = groups[index] if index is not None else "other ops"
        group = own or (groups[parent] if parent is not None else "other ops")
        groups.append(group)
        if event.sequence_nr >= 0 and "forward" in group:
            forward_groups.setdefault(event.sequence_nr, group)
    totals, ops = defaultdict(float), defaultdict(lambda: defaultdict(float))
    for (event, _, self_us), group in zip(nested, groups):
        totals[group] += self_us / 1000
        ops[group][event.name] += self_us / 1000
    inside = sum(e.time_range.elapsed_us() for e, p, _ in nested if p is None) / 1000
    totals["Python outside ops"] = max(window_s * 1000 - inside, 0.0)
    top = {g: sorted(o.items(), key=lambda kv: -kv[1])[:6] for g, o in ops.items()}
    return {"window_ms": window_s * 1000, "groups_ms": dict(totals), "top_ops_ms": top}


def format_profile(profile: dict) -> str:
    window = profile["window_ms"]
    lines = [f"profile of step {profile['step']} ({window:.0f} ms with the profiler on; self time per group):"]
    for group, ms in sorted(profile["groups_ms"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {group:<26} {ms:9.1f} ms  {ms / window:6.1%}")
        for name, op_ms in profile["top_ops_ms"].get(group, [])[:4]:
            if op_ms >= 0.05 * ms or op_ms >= 1:
                lines.append(f"      {name[:70]:<70} {op_ms:8.1f} ms")
    return "\n".join(lines)
