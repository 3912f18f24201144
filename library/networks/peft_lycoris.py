"""What the LyCORIS kinds (LoHa, LoKr) share: peft injects and trains them (`LoHaConfig` / `LoKrConfig`), and
a file holds each peft parameter under the LyCORIS name peft already gives it (`<kohya name>.hada_w1_a`,
`.lokr_w1`, ...) plus `<kohya name>.alpha` — the layout A1111's built-in Lora extension and ComfyUI read
(REFERENCE.md). Module names are the kohya LoRA names (library/networks/targets.py).

peft's tensors and LyCORIS's are the same (checked in tests/networks/test_lycoris.py); where their scaling
differs (LoKr without a low-rank factor) the LoKr kind makes the trained network follow A1111/ComfyUI.
"""
from __future__ import annotations

import json
from typing import Callable

import torch
from peft import inject_adapter_in_model
from peft.tuners.lycoris_utils import LycorisConfig, LycorisLayer
from torch import nn

from library.networks.base import NetworkSpec, Target
from library.networks.lora import ADAPTER
from library.networks.lean_forward import use_lean_forward

# The scale A1111/ComfyUI give a module of a file (tensors, module name) → alpha / rank, or 1 without either.
FileScale = Callable[[dict[str, torch.Tensor], str], float]


def inject_lycoris(config_class: type[LycorisConfig], model: nn.Module, targets: list[Target], spec: NetworkSpec,
                   **options) -> None:
    """Inject peft LoHa/LoKr layers at `targets`; 3x3 convs get conv_rank/conv_alpha."""
    ranks, alphas = spec.rank_patterns(targets)
    config = config_class(r=spec.rank, alpha=spec.alpha, target_modules=[t.path for t in targets],
                          rank_pattern=ranks, alpha_pattern=alphas, **options)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    use_lean_forward(model)


def lycoris_layers(model: nn.Module, layer_class: type[LycorisLayer]) -> dict[str, LycorisLayer]:
    """Module path → injected layer of `layer_class` that carries Kiln's adapter."""
    return {path: m for path, m in model.named_modules()
            if isinstance(m, layer_class) and ADAPTER in m._available_adapters}


def layer_tensors(layer: LycorisLayer) -> dict[str, nn.Parameter]:
    """The adapter's parameters of one layer by their LyCORIS names (only those the layer's shape uses)."""
    return {name: getattr(layer, name)[ADAPTER] for name in layer.adapter_layer_names
            if ADAPTER in getattr(layer, name)}


def lycoris_parameters(model: nn.Module, layer_class: type[LycorisLayer]) -> list[nn.Parameter]:
    return [p for layer in lycoris_layers(model, layer_class).values() for p in layer_tensors(layer).values()
            if p.requires_grad]


def lycoris_state_dict(model: nn.Module, layer_class: type[LycorisLayer], targets: list[Target],
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`<kohya name>.<lycoris tensor>` and `<kohya name>.alpha` for every target."""
    layers = lycoris_layers(model, layer_class)
    out = {}
    for target in targets:
        layer = layers[target.path]
        for param_name, param in layer_tensors(layer).items():
            out[f"{target.kohya_name}.{param_name}"] = param.detach().to("cpu", dtype).contiguous()
        out[f"{target.kohya_name}.alpha"] = torch.tensor(float(layer.alpha[ADAPTER]), dtype=dtype)
    return out


def _shapes(tensors: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(tensors.items()))


def load_lycoris(model: nn.Module, layer_class: type[LycorisLayer], targets: list[Target],
                 weights: dict[str, torch.Tensor], scale_of: FileScale) -> int:
    """Copy a file's tensors into injected layers (continue training from a file, resume); returns modules
    loaded. ValueError naming the module when the file's tensors do not fit the configured network."""
    layers = lycoris_layers(model, layer_class)
    loaded = 0
    for target in targets:
        layer, name = layers[target.path], target.kohya_name
        ours = layer_tensors(layer)
        theirs = {p: weights[f"{name}.{p}"] for p in layer.adapter_layer_names if f"{name}.{p}" in weights}
        if not theirs:
            continue
        if {p: tuple(t.shape) for p, t in theirs.items()} != {p: tuple(t.shape) for p, t in ours.items()}:
            raise ValueError(f"{name}: the file has {_shapes(theirs)}, the network is configured with "
                             f"{_shapes(ours)}; set network.rank / conv_rank / factor to match the file")
        with torch.no_grad():
            for param_name, param in ours.items():
                param.copy_(theirs[param_name])
        alpha = weights.get(f"{name}.alpha")
        layer.alpha[ADAPTER] = float(alpha) if alpha is not None else float(layer.r[ADAPTER])
        layer.scaling[ADAPTER] = scale_of(weights, name)  # as A1111/ComfyUI apply the file
        loaded += 1
    return loaded


def alpha_scale(weights: dict[str, torch.Tensor], name: str, rank: int | None) -> float:
    """alpha / rank as A1111 and ComfyUI compute it: 1.0 when the file has no alpha or the module no rank."""
    alpha = weights.get(f"{name}.alpha")
    if alpha is None or rank is None:
        return 1.0
    return float(alpha) / rank


def refuse_unsupported(weights: dict[str, torch.Tensor], name: str) -> None:
    """A LyCORIS option whose maths Kiln does not apply (DoRA); merging it as plain LoHa/LoKr would be wrong."""
    if f"{name}.dora_scale" in weights:
        raise ValueError(f"{name} uses DoRA (dora_wd), which Kiln cannot merge; merge the file in A1111 or ComfyUI")


def lycoris_metadata(algo: str, spec: NetworkSpec, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The ss_network_* strings sd-scripts writes for `--network_module lycoris.kohya` (args as strings)."""
    # conv_dim "0" is written on purpose: LyCORIS adapts 3x3 convs at network_dim when conv_dim is missing
    args = {"algo": algo, "conv_dim": str(spec.conv_rank), "conv_alpha": f"{spec.conv_alpha:g}", **(extra or {})}
    return {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(spec.rank),
            "ss_network_alpha": f"{spec.alpha:g}", "ss_network_args": json.dumps(args),
            "ss_network_dropout": str(spec.dropout)}
