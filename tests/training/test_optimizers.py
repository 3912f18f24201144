"""Optimizer registry: every name users know trains on the CPU, and mistakes give one clear line."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.training import optimizers
from library.registry import OPTIMIZER_NAMES, OptimizerError, canonical_optimizer_name, optimizer_name_problem
from library.training.optimizers import build_optimizer, step_implementation, uses_relative_step
from library.training.schedules import build_scheduler, current_lrs

BNB_HINT = "use AdamW, or install CUDA bitsandbytes (requirements-gpu.txt)"

# D-Adaptation/Prodigy start from a tiny step estimate (d0=1e-6); a larger d0 makes 3 steps visible.
TRAIN_SETTINGS = {
    "DAdaptAdam": (1.0, {"d0": 1e-2}),
    "Prodigy": (1.0, {"d0": 1e-2}),
}


def _quadratic_run(optimizer, model, steps=3, scheduler=None):
    torch.manual_seed(1)
    x = torch.randn(32, model.in_features)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (model(x) ** 2).mean()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append((model(x) ** 2).mean().item())
    return losses


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_reduces_a_quadratic_loss(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    lr, args = TRAIN_SETTINGS.get(name, (0.05, {}))
    try:
        optimizer = build_optimizer(name, [{"params": list(model.parameters()), "name": "unet"}], lr, args)
    except OptimizerError as exc:  # only bitsandbytes may be unable to run on some hardware
        assert name == "AdamW8bit" and BNB_HINT in str(exc)
        return
    losses = _quadratic_run(optimizer, model)
    assert losses[-1] < 0.8 * losses[0], losses
    assert optimizer.param_groups[0]["name"] == "unet"  # kept for per-group lr logging


def test_adamw8bit_keeps_8bit_state_for_large_tensors():
    model = torch.nn.Linear(64, 64)  # 4096 weights: bitsandbytes' threshold for 8-bit state
    optimizer = build_optimizer("AdamW8bit", [{"params": list(model.parameters())}], 0.01, {})
    losses = _quadratic_run(optimizer, model)
    assert losses[-1] < losses[0]
    assert optimizer.state[model.weight]["state1"].dtype == torch.uint8


def test_adamw8bit_without_bitsandbytes_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(OptimizerError) as info:
        build_optimizer("AdamW8bit", [{"params": list(model.parameters())}], 1e-4, {})
    message = str(info.value)
    assert "AdamW8bit" in message and "bitsandbytes" in message and BNB_HINT in message
    assert "\n" not in message


def test_adamw8bit_that_cannot_step_on_this_hardware_is_refused_up_front(monkeypatch):
    import bitsandbytes.optim

    def no_kernel(self, closure=None):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(bitsandbytes.optim.AdamW8bit, "step", no_kernel)
    monkeypatch.setattr(optimizers, "_bnb_probe_ok", {})
    model = torch.nn.Linear(2, 1)
    with pytest.raises(OptimizerError) as info:
        build_optimizer("AdamW8bit", [{"params": list(model.parameters())}], 1e-4, {})
    assert "cannot run on cpu" in str(info.value) and "no kernel image" in str(info.value)
    assert BNB_HINT in str(info.value)


def test_importing_bitsandbytes_and_adafactor_prints_nothing():
    code = (
        "import torch\n"
        "from library.training.optimizers import build_optimizer\n"
        "p = [torch.nn.Parameter(torch.zeros(4))]\n"
        "build_optimizer('AdamW8bit', [{'params': p}], 1e-4, {})\n"
        "build_optimizer('Adafactor', [{'params': p}], 1e-4, {})\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


@pytest.mark.parametrize(
    "spelling, canonical",
    [("adamw8bit", "AdamW8bit"), ("AdamW_8bit", "AdamW8bit"), ("adamw", "AdamW"), ("LION", "Lion"),
     ("dadaptation", "DAdaptAdam"), ("dadapt_adam", "DAdaptAdam"), ("prodigy", "Prodigy"),
     ("adafactor", "Adafactor"), ("sgd_nesterov", "SGDNesterov")],
)
def test_names_are_case_insensitive_and_accept_aliases(spelling, canonical):
    assert optimizer_name_problem(spelling) is None
    assert canonical_optimizer_name(spelling) == canonical


@pytest.mark.parametrize("typo, suggestion", [("Adam8bit", "AdamW8bit"), ("Prodigi", "Prodigy"), ("Adafacter", "Adafactor")])
def test_unknown_name_suggests_the_closest(typo, suggestion):
    message = optimizer_name_problem(typo)
    assert f"'{typo}'" in message and f"did you mean '{suggestion}'" in message
    with pytest.raises(OptimizerError, match=f"did you mean '{suggestion}'"):
        build_optimizer(typo, [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 1e-4, {})


def test_unknown_arg_names_the_arg_and_the_optimizer():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(OptimizerError) as info:
        build_optimizer("AdamW", [{"params": params}], 1e-4, {"betta": [0.9, 0.99]})
    assert "AdamW" in str(info.value) and "optimizer.args.betta" in str(info.value)
    assert "did you mean 'betas'" in str(info.value)
    with pytest.raises(OptimizerError, match="Lion does not take optimizer.args.decouple"):
        build_optimizer("Lion", [{"params": params}], 1e-4, {"decouple": True})


def test_bad_arg_value_is_one_line_naming_the_optimizer():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(OptimizerError) as info:
        build_optimizer("AdamW", [{"params": params}], 1e-4, {"betas": [1.5, 0.9]})
    assert str(info.value).startswith("AdamW:") and "beta" in str(info.value) and "\n" not in str(info.value)


def test_lr_in_args_is_refused():
    with pytest.raises(OptimizerError, match="optimizer.args.lr .*optimizer.lr"):
        build_optimizer("AdamW", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], 1e-4, {"lr": 1e-3})


def test_toml_lists_become_tuples_and_group_lrs_are_kept():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [a], "name": "unet"}, {"params": [b], "name": "text_encoder", "lr": 5e-5}]
    optimizer = build_optimizer("DAdaptAdam", groups[:1], 1.0, {"betas": [0.9, 0.99], "decouple": True})
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert isinstance(optimizer.param_groups[0]["betas"], tuple)
    optimizer = build_optimizer("AdamW", groups, 1e-4, {})
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 5e-5]


def test_sgd_nesterov_defaults():
    optimizer = build_optimizer("SGDNesterov", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], 0.1, {})
    assert optimizer.param_groups[0]["nesterov"] is True and optimizer.param_groups[0]["momentum"] == 0.9
    with pytest.raises(OptimizerError, match="nesterov"):
        build_optimizer("SGDNesterov", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], 0.1, {"nesterov": False})


@pytest.mark.parametrize("name", ["DAdaptAdam", "Prodigy"])
def test_adaptive_optimizers_warn_about_small_lr(name, capsys):
    params = [torch.nn.Parameter(torch.zeros(2))]
    build_optimizer(name, [{"params": params, "name": "unet"}], 1e-4, {})
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and name in out and "lr=0.0001" in out and "1.0" in out
    build_optimizer(name, [{"params": params}], 1.0, {})
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name", ["DAdaptAdam", "Prodigy"])
def test_adaptive_optimizers_refuse_differing_group_lrs(name):
    # The libraries accept these groups but raise a RuntimeError on the first step.
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    groups = [{"params": [a], "name": "unet", "lr": 1.0}, {"params": [b], "name": "text_encoder", "lr": 0.5}]
    with pytest.raises(OptimizerError) as info:
        build_optimizer(name, groups, 1.0, {})
    assert name in str(info.value) and "unet=1" in str(info.value) and "text_encoder=0.5" in str(info.value)
    frozen = [groups[0], {"params": [c], "name": "frozen", "lr": 0.0}]
    build_optimizer(name, frozen, 1.0, {})  # 0 freezes a group, which the libraries allow


def test_adafactor_defaults_to_a_fixed_lr():
    optimizer = build_optimizer("Adafactor", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], 1e-3, {})
    group = optimizer.param_groups[0]
    assert (group["relative_step"], group["scale_parameter"], group["warmup_init"]) == (False, False, False)
    assert group["lr"] == 1e-3
    assert not uses_relative_step("Adafactor", {})
    assert uses_relative_step("adafactor", {"relative_step": True})
    assert not uses_relative_step("AdamW", {"relative_step": True})


def test_adafactor_relative_step_trains_with_its_own_schedule(capsys):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    args = {"relative_step": True, "scale_parameter": True, "warmup_init": False}
    optimizer = build_optimizer("Adafactor", [{"params": list(model.parameters()), "name": "unet", "lr": 1e-4}], 1e-4, args)
    assert "computes its own lr" in capsys.readouterr().out
    scheduler = build_scheduler(optimizer, "constant", 100, relative_step=uses_relative_step("Adafactor", args))
    before = current_lrs(scheduler, optimizer)["unet"]
    losses = _quadratic_run(optimizer, model, steps=3, scheduler=scheduler)
    after = current_lrs(scheduler, optimizer)["unet"]
    assert losses[-1] < losses[0]
    assert before > 0 and after > 0
    # relative_step=True without warmup_init: 1e-2 * max(1e-3, RMS of the weights), not the configured 1e-4
    rms = float(model.weight.detach().pow(2).mean().sqrt())
    assert after == pytest.approx(1e-2 * max(1e-3, rms), rel=0.2)


def test_adafactor_warmup_init_needs_relative_step():
    with pytest.raises(OptimizerError, match="Adafactor: .*relative_step"):
        build_optimizer("Adafactor", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], 1e-3, {"warmup_init": True})


def test_missing_lr_is_reported():
    with pytest.raises(OptimizerError, match="AdamW: optimizer.lr is not set"):
        build_optimizer("AdamW", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], None, {})


def test_adamw_steps_fused_by_default_and_foreach_is_the_loop_batched():
    def steps(args: dict, device: str = "cpu") -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
        params = [torch.nn.Parameter(torch.full((4, 3), float(i), device=device)) for i in range(6)]
        optimizer = build_optimizer("AdamW", [{"params": (p for p in params), "name": "unet"}], 1e-2, args)
        generator = torch.Generator().manual_seed(0)
        for _ in range(4):
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator).to(device)
            optimizer.step()
        return params, optimizer

    fused, optimizer = steps({})  # the params come as a generator: the device check must not use them up
    assert optimizer.defaults["fused"] is True and not optimizer.defaults["foreach"]
    assert step_implementation(optimizer) == "fused"
    batched, optimizer = steps({"foreach": True})
    assert step_implementation(optimizer) == "foreach"
    looped, optimizer = steps({"foreach": False})
    assert step_implementation(optimizer) == ""
    assert all(torch.equal(a, b) for a, b in zip(batched, looped))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fused, looped))
    _, meta = steps({}, device="meta")  # a device without fused kernels: the batched foreach step
    assert meta.defaults["foreach"] is True and not meta.defaults.get("fused")
    sgd = build_optimizer("SGDNesterov", [{"params": [torch.nn.Parameter(torch.ones(2))]}], 1e-3, {})
    assert step_implementation(sgd) == "foreach"
    adafactor = build_optimizer("Adafactor", [{"params": [torch.nn.Parameter(torch.ones(2))]}], 1e-3, {})
    assert "foreach" not in adafactor.defaults and step_implementation(adafactor) == ""

def test_a_resumed_state_keeps_the_step_it_was_saved_with_and_the_start_up_line_says_so():
    def adamw(args: dict) -> torch.optim.Optimizer:
        return build_optimizer("AdamW", [{"params": [torch.nn.Parameter(torch.ones(3))], "name": "unet"}], 1e-3, args)

    saved_by_foreach = adamw({"foreach": True}).state_dict()  # a state from before fused was the default
    resumed = adamw({})
    assert step_implementation(resumed) == "fused"
    resumed.load_state_dict(saved_by_foreach)
    assert step_implementation(resumed) == "foreach"  # the groups decide how torch steps, not the defaults
