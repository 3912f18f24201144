"""Leaner forwards for peft's LoRA, LoHa and LoKr layers: the same output, fewer output-sized tensors per call.

peft computes `result = result + lora_B(lora_A(x)) * scaling`. Each call allocates three tensors the size of
the layer's output (lora_B's output, the product with scaling, the sum) and its backward a fourth (the
gradient times scaling). The fast path here scales lora_A's output instead, which has only `rank` channels,
and adds lora_B's output into the base layer's output in place:

    result = base_layer(x); result += lora_B(lora_A(x) * scaling)

Why by hand: peft has no such option. Measured through train_lora.py on full-size SD1.5 (fp32, 256 px,
rank 16 on UNet and text encoder), back to back: peak RSS during steps 5.42 -> 5.17 GiB and 5.23 -> 5.07
s/step, because fewer short-lived blocks fragment the heap between the activations backward keeps and less
memory is written (docs/PERFORMANCE.md).

The in-place add is safe for the base layers this is used with (plain nn.Linear and nn.Conv2d, no subclass):
their backward keeps their input and weight, never their output. Scaling the rank-sized tensor gives peft's
outputs and gradients bit for bit when scaling is a power of two (alpha/rank = 0.5, 1, 2 ...), and within
float rounding otherwise (tests/networks/test_lean_forward.py).
Everything off the fast path (merged or disabled adapters, several adapters, DoRA and other variants,
peft's per-call arguments) goes to peft's own forward.

peft's LoHa and LoKr layers compute `result + F.linear(x, delta_weight)`; their lean forward adds the second
term in place, one output-sized tensor fewer per call, with the same values and the same random draws for
module dropout.
"""
from __future__ import annotations

import torch
from peft.tuners.loha import layer as peft_loha
from peft.tuners.lokr import layer as peft_lokr
from peft.tuners.lora import layer as peft_lora
from torch import nn


def _on_fast_path(self, args: tuple, kwargs: dict) -> bool:
    adapters = self.active_adapters
    return (not args and not kwargs and not self.disable_adapters and not self.merged and len(adapters) == 1
            and adapters[0] in self.lora_A and adapters[0] not in self.lora_variant)


def _lora(self, x: torch.Tensor) -> torch.Tensor:
    name = self.active_adapters[0]
    lora_A = self.lora_A[name]
    down = lora_A(self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype)))
    return self.lora_B[name](down * self.scaling[name])


def _base_output(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The base layer's output as a tensor of its own, and whether it was computed on the input's rows.
    nn.Linear returns a view for 3-D input, and an in-place add on a view makes backward copy the whole output
    (CopySlices); on the rows as one 2-D matrix (what nn.Linear does inside) the output is not a view. The
    network branch still sees `x`, so gradients reach `x` in peft's order."""
    rows = x.dim() > 2 and isinstance(self.base_layer, nn.Linear)
    return self.base_layer(x.reshape(-1, x.shape[-1]) if rows else x), rows


def _input_shaped(result: torch.Tensor, x: torch.Tensor, rows: bool) -> torch.Tensor:
    return result.view(*x.shape[:-1], result.shape[-1]) if rows else result


def _lean_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if not _on_fast_path(self, args, kwargs):
        return self._peft_forward(x, *args, **kwargs)
    result, rows = _base_output(self, x)
    result.add_(_lora(self, x).reshape(result.shape))
    return _input_shaped(result, x, rows)


def _lean_lycoris_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or self.disable_adapters or self.merged:
        return self._peft_forward(x, *args, **kwargs)
    result, rows = _base_output(self, x)
    for name in self.active_adapters:
        if name not in self._available_adapters:
            continue
        if not self.training or torch.rand(1) > self.module_dropout[name]:  # peft's draw, in peft's order
            delta = self._get_delta_activations(name, x).reshape(result.shape)
            # peft rounds the sum to the input's dtype; in place rounds it to result's: use it where they agree
            same = result.dtype == x.dtype or torch.promote_types(result.dtype, delta.dtype) == result.dtype
            result = result.add_(delta) if same else result + delta
    return _input_shaped(result, x, rows).to(x.dtype)


def _lean_class(name: str, peft_class: type, forward) -> type:
    """A subclass of `peft_class` named `name` whose forward is `forward`; it falls back to peft's own."""
    return type(name, (peft_class,), {
        "__doc__": f"{peft_class.__module__}.{peft_class.__name__} with the lean forward (module docstring).",
        "__module__": __name__, "_peft_forward": peft_class.forward, "forward": forward})


LeanLoraLinear = _lean_class("LeanLoraLinear", peft_lora.Linear, _lean_lora_forward)
LeanLoraConv2d = _lean_class("LeanLoraConv2d", peft_lora.Conv2d, _lean_lora_forward)
LeanLohaLinear = _lean_class("LeanLohaLinear", peft_loha.Linear, _lean_lycoris_forward)
LeanLohaConv2d = _lean_class("LeanLohaConv2d", peft_loha.Conv2d, _lean_lycoris_forward)
LeanLokrLinear = _lean_class("LeanLokrLinear", peft_lokr.Linear, _lean_lycoris_forward)
LeanLokrConv2d = _lean_class("LeanLokrConv2d", peft_lokr.Conv2d, _lean_lycoris_forward)

# (peft's layer class, its base layer's class) -> the lean subclass; other base layers keep peft's forward
_LEAN = {(peft_lora.Linear, nn.Linear): LeanLoraLinear, (peft_lora.Conv2d, nn.Conv2d): LeanLoraConv2d,
         (peft_loha.Linear, nn.Linear): LeanLohaLinear, (peft_loha.Conv2d, nn.Conv2d): LeanLohaConv2d,
         (peft_lokr.Linear, nn.Linear): LeanLokrLinear, (peft_lokr.Conv2d, nn.Conv2d): LeanLokrConv2d}


def use_lean_forward(model: nn.Module) -> int:
    """Give each of `model`'s peft LoRA, LoHa and LoKr Linear / Conv2d layers the lean forward (a subclass with
    the same state, so peft and everything that checks isinstance still sees its own layer). Returns how many
    were changed."""
    changed = 0
    for module in model.modules():
        lean = _LEAN.get((type(module), type(getattr(module, "base_layer", None))))
        if lean is not None:
            module.__class__ = lean
            changed += 1
    return changed
