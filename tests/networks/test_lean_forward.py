"""The lean LoRA / LoHa / LoKr forwards: peft's results (bit for bit when alpha/rank is a power of two), fewer
bytes allocated."""
import copy

import pytest
import torch
from peft.tuners.lora import layer as peft_lora
from torch.utils._python_dispatch import TorchDispatchMode

from library.models.builtin import build_builtin
from library.networks import lora
from library.networks.base import NetworkSpec
from library.networks.lean_forward import _LEAN, LeanLoraConv2d, LeanLoraLinear
from library.networks.loha import LOHA
from library.networks.lokr import LOKR
from library.networks.targets import unet_targets

PEFT_CLASS = {lean: peft_class for (peft_class, _), lean in _LEAN.items()}


@pytest.fixture(scope="module")
def base():
    return build_builtin("tiny-sd15")


def with_network(base, alpha, kind=None, **spec):
    """The tiny UNet with a network on its linear and conv layers (LoRA unless `kind`), every weight random."""
    parts = copy.deepcopy(base)
    targets = unet_targets(parts, with_conv=True)
    spec = NetworkSpec(rank=4, alpha=alpha, conv_rank=2, conv_alpha=alpha / 2, **spec)
    if kind is None:
        lora.add_lora(parts.unet, targets, spec)
    else:
        kind.inject(parts.unet, targets, spec)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in parts.unet.named_parameters():
            if param.requires_grad:  # peft starts lora_B (LoHa/LoKr: one factor) at zero: give each an effect
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return parts.unet


def as_peft(unet):
    """The same weights with peft's own forward."""
    unet = copy.deepcopy(unet)
    for module in unet.modules():
        if type(module) in PEFT_CLASS:
            module.__class__ = PEFT_CLASS[type(module)]
    return unet


def forward_backward(unet):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    out = unet(latents, torch.tensor([10, 700]), encoder_hidden_states=states).sample
    out.square().mean().backward()
    grads = {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}
    return out.detach(), grads


def test_add_lora_gives_every_linear_and_conv_layer_the_lean_forward(base):
    unet = with_network(base, 2.0)
    kinds = [type(m) for m in unet.modules() if isinstance(m, peft_lora.LoraLayer)]
    assert LeanLoraLinear in kinds and LeanLoraConv2d in kinds
    assert set(kinds) == {LeanLoraLinear, LeanLoraConv2d}


@pytest.mark.parametrize("alpha", [2.0, 3.0])
def test_lean_forward_matches_peft_in_output_and_gradients(base, alpha):
    """alpha/rank 0.5 (a power of two): bit for bit. 0.75: within float rounding."""
    lean = with_network(base, alpha)
    out, grads = forward_backward(lean)
    peft_out, peft_grads = forward_backward(as_peft(lean))
    assert grads.keys() == peft_grads.keys() and len(grads) > 0
    if alpha == 2.0:
        assert torch.equal(out, peft_out)
        assert all(torch.equal(grads[n], peft_grads[n]) for n in grads)
    else:
        torch.testing.assert_close(out, peft_out, rtol=1e-5, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(grads[name], peft_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind, spec", [(LOHA, {}), (LOKR, {"factor": 4})])
def test_loha_and_lokr_lean_forward_match_peft_bit_for_bit(base, kind, spec):
    lean = with_network(base, 2.0, kind, **spec)
    assert {type(m).__name__ for m in lean.modules() if type(m) in PEFT_CLASS} == {
        f"Lean{kind.name.capitalize()}Linear", f"Lean{kind.name.capitalize()}Conv2d"}
    out, grads = forward_backward(lean)
    peft_out, peft_grads = forward_backward(as_peft(lean))
    assert grads.keys() == peft_grads.keys() and len(grads) > 0
    assert torch.equal(out, peft_out)
    assert all(torch.equal(grads[n], peft_grads[n]) for n in grads)


def test_lycoris_module_dropout_draws_like_peft(base):
    """peft draws torch.rand(1) per layer call in training; the lean forward draws the same, in the same order."""
    lean = with_network(base, 2.0, LOHA)
    for module in lean.modules():
        if type(module) in PEFT_CLASS:
            module.module_dropout["kiln"] = 0.5
    peft = as_peft(lean)
    outputs = []
    for unet in (lean, peft):
        torch.manual_seed(3)
        outputs.append(forward_backward(unet.train())[0])
    assert torch.equal(outputs[0], outputs[1])
    lean_without_dropout = with_network(base, 2.0, LOHA)
    assert not torch.equal(outputs[0], forward_backward(lean_without_dropout)[0])  # the dropout did act


def test_disabled_adapters_fall_back_to_peft_and_give_the_base_output(base):
    unet = with_network(base, 2.0)
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        assert not torch.equal(layer(x), layer.base_layer(x))
        layer.enable_adapters(False)
        assert torch.equal(layer(x), layer.base_layer(x))


class AllocatedBytes(TorchDispatchMode):
    """Bytes of the new tensors ops return (views and in-place results share an input's storage and are not
    counted). Forward and backward both run in this thread on the CPU."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.total += tensor.untyped_storage().nbytes()
        return out


@pytest.mark.parametrize("kind, saved", [(None, 2), (LOHA, 1), (LOKR, 1)])
@pytest.mark.parametrize("layer_path", ["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
                                        "down_blocks.0.resnets.0.conv1"])
def test_lean_forward_allocates_fewer_output_sized_tensors_per_layer_call(base, layer_path, kind, saved):
    """What lowers peak memory in training. LoRA: peft allocates lora_B's output, its product with scaling and
    the sum, plus the scaled gradient in backward; the lean forward only lora_B's output. LoHa/LoKr: peft
    allocates the delta activations and the sum; the lean forward only the delta activations."""
    lean_layer = with_network(base, 3.0, kind, **({"factor": 4} if kind is LOKR else {})).get_submodule(layer_path)
    peft_layer = copy.deepcopy(lean_layer)
    peft_layer.__class__ = PEFT_CLASS[type(lean_layer)]
    linear = isinstance(lean_layer.base_layer, torch.nn.Linear)
    x = torch.randn((2, 64, lean_layer.base_layer.in_features) if linear else
                    (2, lean_layer.base_layer.in_channels, 16, 16))
    allocated = {}
    for label, layer in (("lean", lean_layer), ("peft", peft_layer)):
        with AllocatedBytes() as counter:
            out = layer(x)
            out.backward(torch.ones_like(out))
        allocated[label] = counter.total
        output_bytes = out.untyped_storage().nbytes()
    assert allocated["peft"] - allocated["lean"] >= saved * output_bytes
