"""Optimizer registry: the names users know from kohya's sd-scripts, built from a TOML table of args.

Every optional library is imported lazily, so validating a config never pays for (or trips over) a
package the run does not use. Problems surface as OptimizerError with a one-line, user-facing message.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
from typing import Any

import torch

from library.quiet import silenced
from library.registry import OptimizerError, canonical_optimizer_name

_PACKAGE_HINT = "install it with: pip install -r requirements.txt"
_BNB_HINT = "use AdamW, or install CUDA bitsandbytes (requirements-gpu.txt)"

# D-Adaptation style optimizers estimate the step size themselves; lr is only a multiplier on it.
_ADAPTIVE_LR = ("DAdaptAdam", "Prodigy")
_ADAPTIVE_LR_RANGE = (0.1, 10.0)

# bitsandbytes only keeps 8-bit state for tensors at least this big (its min_8bit_size default),
# so the probe must be this large to exercise the 8-bit kernels at all.
_BNB_PROBE_NUMEL = 4096
_bnb_probe_ok: dict[str, bool] = {}


def uses_relative_step(name: str, args: dict) -> bool:
    """True for Adafactor with relative_step=True: the optimizer then computes its own lr."""
    return canonical_optimizer_name(name) == "Adafactor" and bool((args or {}).get("relative_step", False))


def _import_quietly(module: str, optimizer: str, package: str) -> Any:
    try:
        with silenced():
            return importlib.import_module(module)
    except Exception as exc:  # an import can fail with anything (missing CUDA libs, ABI mismatch ...)
        if optimizer == "AdamW8bit":
            raise OptimizerError(f"AdamW8bit: bitsandbytes failed to import ({_first_line(exc)}); {_BNB_HINT}") from exc
        raise OptimizerError(f"{optimizer} needs the {package} package ({_first_line(exc)}); {_PACKAGE_HINT}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _optimizer_class(name: str) -> type:
    if name == "AdamW":
        return torch.optim.AdamW
    if name == "SGDNesterov":
        return torch.optim.SGD
    if name == "AdamW8bit":
        return _import_quietly("bitsandbytes.optim", name, "bitsandbytes").AdamW8bit
    if name == "Lion":
        return _import_quietly("lion_pytorch", name, "lion-pytorch").Lion
    if name == "DAdaptAdam":
        return _import_quietly("dadaptation", name, "dadaptation").DAdaptAdam
    if name == "Prodigy":
        return _import_quietly("prodigyopt", name, "prodigyopt").Prodigy
    # transformers.optimization pulls in peft, which imports bitsandbytes: same banner to hide.
    return _import_quietly("transformers.optimization", name, "transformers").Adafactor


def _prepare_kwargs(name: str, args: dict) -> dict:
    """TOML args -> constructor kwargs: lists become tuples, registry defaults filled in."""
    kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in (args or {}).items()}
    for reserved in ("lr", "params"):
        if reserved in kwargs:
            where = "optimizer.lr" if reserved == "lr" else "the trainer (it picks the parameters)"
            raise OptimizerError(f"{name}: optimizer.args.{reserved} is not allowed; it is set by {where}")
    if name == "SGDNesterov":
        if kwargs.get("nesterov", True) is not True:
            raise OptimizerError("SGDNesterov: optimizer.args.nesterov must stay true (use another optimizer for plain SGD)")
        kwargs["nesterov"] = True
        kwargs.setdefault("momentum", 0.9)
    if name == "Adafactor":
        # transformers defaults these to True; a fixed, scheduler-driven lr is the less surprising default.
        for flag in ("scale_parameter", "relative_step", "warmup_init"):
            kwargs.setdefault(flag, False)
    return kwargs


# PyTorch's fused AdamW kernels run on these devices (torch 2.4+); elsewhere the batched foreach step is used.
_FUSED_DEVICES = ("cpu", "cuda")


def _prefer_batched_step(cls: type, kwargs: dict, groups: list[dict]) -> None:
    """Unless optimizer.args chose foreach or fused itself: AdamW steps with PyTorch's fused kernel, other
    PyTorch optimizers step every tensor of a group in one batched (foreach) call instead of a Python loop.
    Fused reads each tensor once and allocates nothing; foreach allocates temporaries as large as the
    optimizer state. A full-UNet DreamBooth step on SD1.5 spent 45 % of its time there and held 3 GiB more
    (docs/PERFORMANCE.md). PyTorch itself defaults to foreach on GPUs only and never to fused."""
    if "foreach" in kwargs or "fused" in kwargs:
        return
    params = [p for group in groups for p in group["params"]]
    if cls is torch.optim.AdamW and params and all(
            p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params):
        kwargs["fused"] = True
    elif "foreach" in inspect.signature(cls.__init__).parameters:
        kwargs["foreach"] = True


def step_implementation(optimizer: torch.optim.Optimizer) -> str:
    """"fused", "foreach" or "" (a per-tensor loop, a third-party optimizer, or groups that differ), for the
    start-up line. Read from the groups, not the defaults: a resumed state brings its own groups' choice."""
    kinds = {"fused" if group.get("fused") else "foreach" if group.get("foreach") else ""
             for group in optimizer.param_groups}
    return kinds.pop() if len(kinds) == 1 else ""


def _check_arg_names(name: str, cls: type, kwargs: dict) -> None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in ("self", "params", "lr")]
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise OptimizerError(
                f"{name} does not take optimizer.args.{key}; {hint}it takes: {', '.join(accepted)}"
            )


def _group_lrs(param_groups: list[dict], lr: float | None) -> list[tuple[str, float | None]]:
    return [(g.get("name", f"group{i}"), g.get("lr", lr)) for i, g in enumerate(param_groups)]


def _check_adaptive_lr(name: str, param_groups: list[dict], lr: float | None) -> None:
    """DAdaptAdam/Prodigy: warn on an lr far from 1.0; refuse differing group lrs, which these
    optimizers reject with a RuntimeError on the first step (dadaptation 3.2, prodigyopt 1.1)."""
    lrs = _group_lrs(param_groups, lr)
    low, high = _ADAPTIVE_LR_RANGE
    for group, value in lrs:
        if value is not None and 0 < value and not low <= value <= high:
            print(f"warning: {name} expects lr around 1.0 (it finds the step size itself; lr only scales it), "
                  f"but {group} has lr={value:g}; set optimizer.lr = 1.0")
    nonzero = {value for _, value in lrs if value}
    if len(nonzero) > 1:
        listed = ", ".join(f"{group}={value:g}" for group, value in lrs)
        raise OptimizerError(
            f"{name} needs the same lr in every parameter group (0 to freeze one is allowed), got {listed}; "
            "give the text encoder and U-Net the same lr"
        )


def _prepare_relative_step(param_groups: list[dict], lr: float | None) -> list[dict]:
    """Adafactor relative_step computes its own lr, so drop every lr (the constructor refuses one)."""
    lrs = _group_lrs(param_groups, lr)
    if len({value for _, value in lrs}) > 1:
        listed = ", ".join(f"{group}={value:g}" for group, value in lrs if value is not None)
        print(f"warning: Adafactor with relative_step=True uses one computed lr; per-group lrs ({listed}) are ignored")
    elif lr is not None:
        print(f"note: Adafactor with relative_step=True computes its own lr; optimizer.lr={lr:g} is not used")
    return [{k: v for k, v in group.items() if k != "lr"} for group in param_groups]


def _probe_bitsandbytes(cls: type, param_groups: list[dict]) -> None:
    """Take one 8-bit step on a throwaway tensor on the params' device; bitsandbytes imports fine on
    hardware it has no kernels for and only fails at the first step, mid-run."""
    device = next((p.device for g in param_groups for p in g.get("params", [])), torch.device("cpu"))
    if _bnb_probe_ok.get(str(device)):
        return
    try:
        with silenced():
            probe = torch.nn.Parameter(torch.ones(_BNB_PROBE_NUMEL, device=device))
            opt = cls([probe], lr=1e-3)
            probe.grad = torch.ones_like(probe)
            opt.step()
    except Exception as exc:
        raise OptimizerError(f"AdamW8bit: bitsandbytes cannot run on {device} ({_first_line(exc)}); {_BNB_HINT}") from exc
    _bnb_probe_ok[str(device)] = True


def build_optimizer(name: str, param_groups: list[dict], lr: float | None, args: dict) -> torch.optim.Optimizer:
    """Build the named optimizer.

    param_groups: [{"params": [...], "lr": x, "name": "unet"}, ...]; a group without "lr" uses `lr`.
    args: the TOML table optimizer.args as keyword args (lists become tuples, e.g. betas).
    Prints one line per warning; raises OptimizerError with a one-line message naming the optimizer/arg.
    """
    canonical = canonical_optimizer_name(name)
    kwargs = _prepare_kwargs(canonical, args)
    cls = _optimizer_class(canonical)
    _check_arg_names(canonical, cls, kwargs)
    groups = [dict(group) for group in param_groups]
    for group in groups:
        params = group["params"]  # a list, a generator (used up by the device check below) or one tensor
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
    _prefer_batched_step(cls, kwargs, groups)
    if canonical in _ADAPTIVE_LR:
        _check_adaptive_lr(canonical, groups, lr)
    if canonical == "Adafactor" and kwargs["relative_step"]:
        groups = _prepare_relative_step(groups, lr)
        lr = None
    elif lr is None:
        if not groups or any("lr" not in group for group in groups):
            raise OptimizerError(f"{canonical}: optimizer.lr is not set")
        lr = groups[0]["lr"]  # constructors insist on a default; every group overrides it
    try:
        optimizer = cls(groups, lr=lr, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise OptimizerError(f"{canonical}: bad optimizer.lr/optimizer.args ({_first_line(exc)})") from exc
    if canonical == "AdamW8bit":
        _probe_bitsandbytes(cls, optimizer.param_groups)  # its params are lists now, even if given generators
    return optimizer


def check_optimizer(name: str, lr: float | None, args: dict, group_lrs: dict[str, float] | None = None) -> None:
    """Build the optimizer once on throwaway tensors, one parameter group per entry of `group_lrs` (the run's
    groups and rates: "unet", "text_encoder", ...), so a bad name, argument, value or rate combination (or a
    library that cannot run here) fails before any model loads. Raises OptimizerError; prints nothing."""
    groups = [{"params": [torch.zeros(4, requires_grad=True)], "lr": rate, "name": group}
              for group, rate in (group_lrs or {"check": lr}).items()]
    with silenced(), _without_compiler():
        build_optimizer(name, groups, lr, dict(args or {}))


@contextlib.contextmanager
def _without_compiler():
    """torch.optim.Optimizer's methods import torch's compiler on first use (~3 s on 2 cores), only to mark
    themselves as not to be compiled. A throwaway optimizer that validates arguments needs none of that: hand
    those methods their cached "not compiled" form up front, and take it back afterwards so a real optimizer is
    built as usual. If a torch release renames this internal, the check still works, only slower."""
    wrapped = [getattr(method, "__wrapped__") for method in vars(torch.optim.Optimizer).values()
               if callable(method) and hasattr(method, "__wrapped__")]
    patched = [fn for fn in wrapped if not hasattr(fn, "__dynamo_disable")]
    for fn in patched:
        setattr(fn, "__dynamo_disable", fn)
    try:
        yield
    finally:
        for fn in patched:
            delattr(fn, "__dynamo_disable")
