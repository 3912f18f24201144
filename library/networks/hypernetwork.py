"""A1111 hypernetworks: per context width a pair of small MLPs that rewrite the inputs of the attention key and
value projections (`k_in = c + mlp_k(c) · strength`, `v_in` likewise; the query is untouched), A1111's `.pt`
file (a `torch.save`d dict of plain containers, numbers, strings and tensors, so ComfyUI's weights-only loader
reads it too) and its `.optim` companion.

Applied with forward pre-hooks on every UNet attention's `to_k` / `to_v` (looked up by their input width,
as A1111 looks up the context's last dimension), not with a custom attention processor: every diffusers
processor (SDPA, xformers, the plain one) calls `attn.to_k(context)` and `attn.to_v(context)`, so the hooks
keep working whichever backend `train.attention` selects, and selecting one later cannot remove them."""
from __future__ import annotations

import hashlib
import inspect
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from library.atomic import write_atomically
from library.errors import UserError
from library.networks.hypernetwork_spec import HypernetworkSpec, a1111_dropout_structure, structure_problems


class HypernetworkFileError(UserError, ValueError):
    """A hypernetwork file Kiln cannot read or apply; the message names the file and what to do."""


def activation_classes() -> dict[str, type[nn.Module]]:
    """A1111's activation table: its own names, then every torch.nn.modules.activation class lower-cased."""
    table: dict[str, type[nn.Module]] = {"linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU,
                                         "elu": nn.ELU, "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    table.update({name.lower(): cls for name, cls in inspect.getmembers(nn.modules.activation, inspect.isclass)
                  if cls.__module__ == "torch.nn.modules.activation"})
    return table


class HypernetworkModule(nn.Module):
    """One MLP as A1111 builds it: the nn.Sequential is the attribute `linear` (so its keys read
    `linear.<index>.weight`), and the output is `x + linear(x) · strength`, with strength 1 while training."""

    def __init__(self, dim: int, spec: HypernetworkSpec):
        super().__init__()
        self.multiplier = 1.0
        widths = [int(dim * value) for value in spec.layer_structure]
        activation = activation_classes()[spec.activation_func]
        layers: list[nn.Module] = []
        index = -1  # the Linear most recently added
        for kind in spec.layout():
            if kind == "linear":
                index += 1
                layers.append(nn.Linear(widths[index], widths[index + 1]))
            elif kind == "activation":
                layers.append(activation())
            elif kind == "layer_norm":
                layers.append(nn.LayerNorm(widths[index + 1]))
            else:
                layers.append(nn.Dropout(p=spec.dropout_structure[index + 1]))
        self.linear = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * (self.multiplier if not self.training else 1)

    def initialise(self, spec: HypernetworkSpec, generator: torch.Generator) -> None:
        """A1111's weight initialisation. LayerNorms always get the Normal one (so their weights start near 0,
        not 1: A1111 does so whatever the chosen init)."""
        init = spec.weight_initialization
        nonlinearity = "leaky_relu" if spec.activation_func == "leakyrelu" else "relu"
        with torch.no_grad():
            for layer in self.linear:
                if type(layer) not in (nn.Linear, nn.LayerNorm):
                    continue
                if init == "Normal" or isinstance(layer, nn.LayerNorm):
                    nn.init.normal_(layer.weight, 0.0, 0.01, generator=generator)
                elif init == "XavierUniform":
                    nn.init.xavier_uniform_(layer.weight, generator=generator)
                elif init == "XavierNormal":
                    nn.init.xavier_normal_(layer.weight, generator=generator)
                elif init == "KaimingUniform":
                    nn.init.kaiming_uniform_(layer.weight, nonlinearity=nonlinearity, generator=generator)
                else:
                    nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity, generator=generator)
                nn.init.zeros_(layer.bias)


class Hypernetwork(nn.Module):
    """A key and a value MLP per context width, plus the bookkeeping A1111 keeps in the file."""

    def __init__(self, spec: HypernetworkSpec, widths: list[int], name: str = "", step: int = 0,
                 sd_checkpoint: str | None = None, sd_checkpoint_name: str | None = None,
                 optional_info: str | None = None):
        super().__init__()
        self.spec = spec
        self.name = name
        self.step = step
        self.sd_checkpoint = sd_checkpoint
        self.sd_checkpoint_name = sd_checkpoint_name
        self.optional_info = optional_info
        self.layers = nn.ModuleDict({str(width): nn.ModuleList([HypernetworkModule(width, spec),
                                                               HypernetworkModule(width, spec)])
                                     for width in widths})

    @property
    def widths(self) -> list[int]:
        return [int(width) for width in self.layers]

    def pair(self, width: int) -> nn.ModuleList | None:
        """(key MLP, value MLP) for a context of this width, or None when the network has none."""
        return self.layers[str(width)] if str(width) in self.layers else None

    def initialise(self, generator: torch.Generator) -> "Hypernetwork":
        for pair in self.layers.values():
            for module in pair:
                module.initialise(self.spec, generator)
        return self

    def set_strength(self, strength: float) -> None:
        """The multiplier used outside training (A1111's `<hypernet:name:strength>`)."""
        for module in self.modules():
            if isinstance(module, HypernetworkModule):
                module.multiplier = strength

    def a1111_dict(self, dtype: torch.dtype = torch.float32) -> dict:
        """The dict A1111 saves: int width → (key state dict, value state dict), then its string keys, every
        one written (ComfyUI's defaults differ from A1111's for missing ones)."""
        data: dict = {}
        for width in self.widths:
            data[width] = tuple(OrderedDict((key, value.detach().to("cpu", dtype).clone())
                                            for key, value in module.state_dict().items())
                                for module in self.pair(width))
        spec = self.spec
        data.update({"step": int(self.step), "name": self.name, "layer_structure": list(spec.layer_structure),
                     "activation_func": spec.activation_func, "is_layer_norm": spec.is_layer_norm,
                     "weight_initialization": spec.weight_initialization, "sd_checkpoint": self.sd_checkpoint,
                     "sd_checkpoint_name": self.sd_checkpoint_name, "activate_output": spec.activate_output,
                     "use_dropout": spec.use_dropout, "dropout_structure": list(spec.dropout_structure),
                     "last_layer_dropout": spec.last_layer_dropout, "optional_info": self.optional_info})
        return data

    def parameter_count(self) -> int:
        return sum(param.numel() for param in self.parameters())


# ---------------------------------------------------------------------------------------------- files


def save_hypernetwork(network: Hypernetwork, path: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write A1111's `.pt` atomically."""
    data = network.a1111_dict(dtype)
    write_atomically(Path(path), lambda tmp: torch.save(data, tmp))


def _spec_from_file(data: dict, path: Path) -> HypernetworkSpec:
    """The structure a file's string keys describe, with A1111's defaults for missing keys (note: a missing
    activate_output means True to A1111, False to ComfyUI; Kiln writes it always)."""
    layers = [float(v) for v in data.get("layer_structure") or [1, 2, 1]]
    activation = data.get("activation_func") or "linear"  # None: no activation, as "linear"
    dropout = data.get("dropout_structure")
    use_dropout = bool(dropout is not None and any(dropout)) or bool(data.get("use_dropout", False))
    if dropout is None:
        dropout = a1111_dropout_structure(layers, use_dropout, bool(data.get("last_layer_dropout", False)))
    dropout = [float(v) for v in dropout]
    problems = structure_problems(layers, dropout, use_dropout, activation, "Normal", "file")
    if problems:
        raise HypernetworkFileError(f"{path}: not a hypernetwork Kiln can build: {problems[0]}")
    return HypernetworkSpec(tuple(layers), activation, str(data.get("weight_initialization") or "Normal"),
                            bool(data.get("is_layer_norm", False)), use_dropout, tuple(dropout),
                            bool(data.get("activate_output", True)))


def _renamed(state: dict) -> dict:
    """A1111's fix for the oldest files: linear1/linear2 are today's linear.0/linear.1."""
    old = {"linear1.": "linear.0.", "linear2.": "linear.1."}
    return {next((new + key[len(o):] for o, new in old.items() if key.startswith(o)), key): value.float()
            for key, value in state.items()}


def load_hypernetwork(path: str | Path) -> Hypernetwork:
    """A hypernetwork `.pt` (A1111's layout) read with `weights_only=True`, in eval mode at strength 1."""
    path = Path(path)
    if not path.is_file():
        raise HypernetworkFileError(f"hypernetwork file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickles with code in them are refused, whatever the error type
        raise HypernetworkFileError(f"{path}: cannot be read as a weights-only torch file "
                                    f"({str(exc).splitlines()[0]})") from None
    widths = [key for key in data if isinstance(key, int)] if isinstance(data, dict) else []
    if not widths:
        raise HypernetworkFileError(f"{path} is not an A1111 hypernetwork (it has no per-width modules)")
    spec = _spec_from_file(data, path)
    network = Hypernetwork(spec, widths, str(data.get("name") or path.stem), int(data.get("step") or 0),
                           data.get("sd_checkpoint"), data.get("sd_checkpoint_name"), data.get("optional_info"))
    for width in widths:
        pair = data[width]
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(s, dict) for s in pair)):
            raise HypernetworkFileError(f"{path}: its {width} entry is not a (key, value) pair of state dicts")
        for module, state in zip(network.pair(width), pair):
            try:
                module.load_state_dict(_renamed(state))
            except RuntimeError:
                raise HypernetworkFileError(f"{path}: its {width}-wide modules do not have the layers its own keys "
                                            f"describe ({spec.describe()})") from None
    return network.eval()


def file_short_hash(path: Path) -> str:
    """A1111's shorthash of a file: the first 10 hex digits of its SHA-256 (what `.optim` files pair by)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


def save_optimizer_state(path: Path, state: dict, optimizer_name: str) -> None:
    """`<file>.pt.optim` beside a saved hypernetwork, as A1111 writes it: paired by the `.pt` file's hash."""
    data = {"optimizer_name": optimizer_name, "hash": file_short_hash(path), "optimizer_state_dict": state}
    write_atomically(Path(f"{path}.optim"), lambda tmp: torch.save(data, tmp))


def load_optimizer_state(path: Path, optimizer_name: str) -> tuple[dict | None, str]:
    """(state, message): refused (None) when `<file>.optim` is missing, belongs to another file (A1111's hash
    check) or to another optimizer; the message says which and what happens."""
    optim = Path(f"{path}.optim")
    if not optim.is_file():
        return None, f"no optimizer state beside {path} ({optim.name}): the optimizer starts fresh"
    try:
        data = torch.load(optim, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        return None, f"{optim} cannot be read ({str(exc).splitlines()[0]}): the optimizer starts fresh"
    expected = file_short_hash(path)
    if data.get("hash") != expected:
        return None, (f"{optim} was saved for another file (hash {data.get('hash')} != {expected}), so it does not "
                      "belong to this hypernetwork: refused, the optimizer starts fresh")
    saved_by = data.get("optimizer_name", "AdamW")
    if saved_by != optimizer_name:
        return None, f"{optim} holds {saved_by} state but this run uses {optimizer_name}: refused, fresh optimizer"
    return data.get("optimizer_state_dict"), f"loaded the optimizer state from {optim}"


# ---------------------------------------------------------------------------------------------- applying


class AttachedHypernetwork:
    """A hypernetwork applied to a model's UNet; `remove()` takes it off again. Several attached networks chain
    in the order attached (A1111 applies its loaded hypernetworks one after another)."""

    def __init__(self, parts, network: Hypernetwork, handles: list, layers: dict[int, int]):
        self.parts = parts
        self.network = network
        self.handles = handles
        self.layers = layers  # width → attention layers rewritten at that width

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.network in self.parts.adapters:
            self.parts.adapters.remove(self.network)


def _rewrite(mlp: HypernetworkModule):
    def hook(module: nn.Module, args: tuple) -> tuple:
        context = args[0]
        dtype = mlp.linear[0].weight.dtype
        # computed in the MLP's own precision and cast back, as A1111 does (cond_cast_float / cond_cast_unet)
        return (mlp(context.to(dtype)).to(context.dtype), *args[1:])
    return hook


def attach(parts, network: Hypernetwork, strength: float = 1.0) -> AttachedHypernetwork:
    """Apply `network` to every attention layer of the model's UNet whose key/value input width has modules in
    it (self-attention at the block widths, cross-attention at the text width). Strength applies in eval mode;
    a network in train mode uses 1, as A1111 trains."""
    from diffusers.models.attention_processor import Attention  # here: diffusers is slow to import

    network.set_strength(strength)
    network.to(parts.unet.device)
    handles, layers = [], {}
    for module in parts.unet.modules():
        if not isinstance(module, Attention) or getattr(module, "to_k", None) is None:
            continue
        width = module.to_k.in_features
        pair = network.pair(width)
        if pair is None:
            continue
        handles.append(module.to_k.register_forward_pre_hook(_rewrite(pair[0])))
        handles.append(module.to_v.register_forward_pre_hook(_rewrite(pair[1])))
        layers[width] = layers.get(width, 0) + 1
    parts.adapters.append(network)
    return AttachedHypernetwork(parts, network, handles, layers)


def unet_widths(parts) -> list[int]:
    """A1111's default sizes for this model: its text (cross-attention) width, then its attention widths."""
    from library.models.header import header_of
    from library.networks.hypernetwork_spec import default_sizes

    header = header_of(parts)
    return default_sizes(header.context_dim, header.attention_widths)
