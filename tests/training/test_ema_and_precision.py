"""The EMA of the trained weights against its closed form, and the half-precision knobs: stochastic rounding,
the fused Adafactor backward pass (the same update as a normal step), unscaling fp16 gradients."""
import pytest
import torch

from library.training.ema import EMA, ema_decay, ema_file_for, save_artifact
from library.training.precision import FusedBackward, allow_fp16_unscale, copy_stochastic_


def test_ema_equals_the_closed_form_after_k_steps_with_an_interval():
    param = torch.nn.Parameter(torch.tensor([10.0, -2.0]))
    ema = EMA([param], decay=0.9, update_interval=3, warmup=False)
    start = param.detach().clone()
    for step in range(1, 13):  # the weight walks to step·(1, 1) + start
        with torch.no_grad():
            param.copy_(start + step)
        assert ema.update(step) == (step % 3 == 0)
    # updates at steps 3, 6, 9, 12: e = d^4 p0 + Σ_j (1 − d) d^(4 − j) p(3j)
    expected = 0.9**4 * start + sum((1 - 0.9) * 0.9 ** (4 - j) * (start + 3 * j) for j in range(1, 5))
    assert torch.allclose(ema.shadow[0], expected, atol=1e-5)


def test_ema_warmup_decay_is_onetrainers():
    assert ema_decay(1, 0.999, True) == pytest.approx(2 / 11)
    assert ema_decay(100, 0.999, True) == pytest.approx(101 / 110)
    assert ema_decay(10**6, 0.999, True) == 0.999
    assert ema_decay(1, 0.999, False) == 0.999


def test_ema_state_round_trips_and_is_swapped_in_only_while_saving(tmp_path):
    param = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([param], decay=0.5, device="cpu")
    with torch.no_grad():
        param.fill_(4.0)
    ema.update(1)
    assert ema.shadow[0].tolist() == [2.0, 2.0, 2.0]
    other = EMA([param], decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError, match="do not match"):
        EMA([torch.nn.Parameter(torch.zeros(5))], 0.5).load_state_dict(ema.state_dict())

    saved = {}

    class Trainable:
        def save(self, path, progress):
            saved[path.name] = param.detach().clone()

    save_artifact(Trainable(), ema, "beside", tmp_path / "t.safetensors", None)
    assert saved["t.safetensors"].tolist() == [4.0] * 3 and saved["t-ema.safetensors"].tolist() == [2.0] * 3
    save_artifact(Trainable(), ema, "result", tmp_path / "u.safetensors", None)
    assert saved["u.safetensors"].tolist() == [2.0] * 3
    assert param.tolist() == [4.0] * 3  # the live weights are back
    assert ema_file_for(tmp_path / "dreambooth") == tmp_path / "dreambooth-ema"


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbouring_bf16_values():
    torch.manual_seed(0)
    value = 1.0 + 2**-10  # between the bf16 neighbours 1.0 and 1.0078125
    source = torch.full((20000,), value)
    target = torch.empty(20000, dtype=torch.bfloat16)
    copy_stochastic_(target, source)
    assert set(target.float().unique().tolist()) == {1.0, 1.0078125}
    assert target.float().mean().item() == pytest.approx(value, abs=2e-4)
    assert source.to(torch.bfloat16).float().unique().tolist() == [1.0]  # round-to-nearest loses the update


def adafactor(params, lr=1e-2):
    from transformers.optimization import Adafactor
    return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False)


def test_fused_backward_pass_takes_the_same_step_as_adafactor():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    fused_model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    fused_model.load_state_dict(model.state_dict())
    x = torch.randn(4, 6)
    plain = adafactor(model.parameters())
    fused = FusedBackward(adafactor(fused_model.parameters()), max_grad_norm=0.0)
    for _ in range(3):
        model(x).pow(2).sum().backward()
        plain.step()
        plain.zero_grad(set_to_none=True)
        fused_model(x).pow(2).sum().backward()  # steps each tensor as its gradient arrives
        assert all(p.grad is None for p in fused_model.parameters())
    for a, b in zip(model.parameters(), fused_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    fused.remove()


def test_fused_backward_pass_updates_bf16_weights_in_fp32_with_stochastic_rounding():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    FusedBackward(adafactor([weight], lr=1e-3), max_grad_norm=1.0)
    weight.float().sum().backward()  # Adafactor's normalised update: −1e-3 each, a quarter of bf16's spacing below 1
    assert weight.dtype == torch.bfloat16
    moved = (weight.float() != 1.0).float().mean().item()
    assert 0.15 < moved < 0.35  # round-to-nearest moves none; stochastic rounding ~1e-3 / 2⁻⁸ of them
    assert weight.float().mean().item() == pytest.approx(1 - 1e-3, abs=3e-4)  # unbiased on average


def test_fp16_gradients_can_be_unscaled_once_allowed():
    for allowed in (False, True):
        param = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        if allowed:
            allow_fp16_unscale(scaler)
        scaler.scale((param.float() * 2).sum()).backward()
        optimizer = torch.optim.SGD([param], lr=0.1)
        if not allowed:
            with pytest.raises(ValueError, match="FP16"):
                scaler.unscale_(optimizer)
        else:
            scaler.unscale_(optimizer)
            assert param.grad.tolist() == [2.0] * 4
