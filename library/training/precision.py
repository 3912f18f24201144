"""Memory knobs for the trained weights, as sd-scripts has them:

- full_bf16 / full_fp16: the trained weights (and so their gradients and the optimizer's state) are kept in
  half precision instead of fp32. With ordinary optimizers each update is rounded to nearest, so updates much
  smaller than the weight (below ~2⁻⁸ of it for bf16) are lost and training can stall: lower-precision memory
  for a coarser optimisation. sd-scripts patches accelerate so fp16 gradients can be unscaled; so does Kiln.
- fused_backward_pass (Adafactor only, sd-scripts' `--fused_backward_pass`): each tensor takes its optimizer
  step as soon as its gradient is ready and the gradient is freed at once, so the gradients of the whole model
  never exist together. Gradient clipping then works per tensor (as in sd-scripts), and bf16 weights are
  updated in fp32 and rounded back stochastically (sd-scripts' `copy_stochastic_`), so small updates survive
  on average.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

def trained_dtype(full_bf16: bool, full_fp16: bool) -> torch.dtype:
    """The dtype the trained weights are kept in."""
    return torch.bfloat16 if full_bf16 else torch.float16 if full_fp16 else torch.float32


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor) -> None:
    """Round fp32 `source` into bf16 `target` stochastically: add random low 16 bits, then truncate, so the
    expected value is `source` (draws from the global RNG, which the loop seeds every step)."""
    noise = torch.randint_like(source, low=0, high=1 << 16, dtype=torch.int32)
    rounded = noise.add_(source.contiguous().view(dtype=torch.int32)).bitwise_and_(-65536)
    target.copy_(rounded.view(dtype=torch.float32))


def allow_fp16_unscale(scaler) -> None:
    """Let a GradScaler unscale fp16 gradients (full_fp16), which it refuses by default (sd-scripts'
    patch_accelerator_for_fp16_training)."""
    original = scaler._unscale_grads_

    def unscale(optimizer, inv_scale, found_inf, allow_fp16):
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale


class FusedBackward:
    """Steps `optimizer` (a plain torch optimizer, e.g. transformers' Adafactor) one tensor at a time from
    post-accumulate-grad hooks. transformers' Adafactor.step walks its param_groups; the hook hands it a group
    holding just the ready tensor, so each step costs one tensor's update."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float):
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.handles = []
        self.group_index: dict[int, int] = {}
        for index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                self.group_index[id(param)] = index
                self.handles.append(param.register_post_accumulate_grad_hook(self._step))

    def _group_of(self, param: torch.nn.Parameter) -> dict:
        return self.optimizer.param_groups[self.group_index[id(param)]]

    @torch.no_grad()
    def _step(self, param: torch.nn.Parameter) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
        groups, low = self.optimizer.param_groups, None
        if param.dtype == torch.bfloat16:  # update in fp32, round back stochastically
            low, param.data, param.grad = param.data, param.data.float(), param.grad.float()
        self.optimizer.param_groups = [{**self._group_of(param), "params": [param]}]
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups
        if low is not None:
            copy_stochastic_(low, param.data)
            param.data = low
        param.grad = None

    @contextlib.contextmanager
    def fp32_state_loading(self) -> Iterator[None]:
        """Load an optimizer state inside this block: torch casts a loaded state to its parameter's dtype, but
        the fused pass keeps Adafactor's state of bf16 weights in fp32 (it steps in fp32), so the weights are
        fp32 (exactly, from bf16) while the state loads."""
        halves = [p for group in self.optimizer.param_groups for p in group["params"] if p.dtype == torch.bfloat16]
        for param in halves:
            param.data = param.data.float()
        try:
            yield
        finally:
            for param in halves:
                param.data = param.data.to(torch.bfloat16)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
