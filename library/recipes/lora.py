"""train_lora.py's recipe: a network (network.type: LoRA/LoCon, LyCORIS LoHa or LoKr) on the UNet and/or text
encoders, saved in the kohya/LyCORIS layout with sd-scripts' metadata."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from library.config.schema import RunConfig, Section
from library.recipes.base import Built, Recipe, model_family, part_lr_settings, table, value_of

LYCORIS_TYPES = ("loha", "lokr")
BLOCK_DIM_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
BLOCK_WEIGHT_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")


class NetworkSection(Section):
    type: Literal["lora", "loha", "lokr"] = "lora"  # the kind (library/networks/kinds.py); LoCon = lora + conv_rank
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(8.0, gt=0)
    conv_rank: int = Field(0, ge=0, le=1024)  # 0 = no conv layers; >0 = LoCon
    conv_alpha: float = Field(1.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)  # LoRA only
    factor: int = Field(-1, ge=-1)  # LoKr: split each layer size as factor × size/factor; -1 = most balanced
    train_unet: bool = True
    train_text_encoder: bool = True
    unet_lr: float | None = Field(None, gt=0)  # None = optimizer.lr
    # one rate for every text encoder, or one per encoder: SDXL [text_encoder, text_encoder_2]; None = optimizer.lr
    text_encoder_lr: float | list[float] | None = None
    init_weights: str = ""  # start from an existing network file of the same kind
    # sd-scripts' networks.lora arguments (library/networks/blocks.py, lora.py)
    rank_dropout: float = Field(0.0, ge=0, lt=1)  # LoRA only
    module_dropout: float = Field(0.0, ge=0, lt=1)  # LoRA only
    down_lr_weight: str | list[float] | None = None  # per UNet block: a list, "1,0.5,...", or "sine+0.5" etc.
    mid_lr_weight: str | float | list[float] | None = None
    up_lr_weight: str | list[float] | None = None
    block_lr_zero_threshold: float = Field(0.0, ge=0)
    block_dims: str | list[int] | None = None  # one rank per UNet block (25 for SD1/2)
    block_alphas: str | list[float] | None = None
    conv_block_dims: str | list[int] | None = None
    conv_block_alphas: str | list[float] | None = None
    scale_weight_norms: float = Field(0.0, ge=0)  # max-norm regularisation; 0 = off; LoRA only

    @model_validator(mode="after")
    def _something_to_train(self) -> "NetworkSection":
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError("network.train_unet and network.train_text_encoder are both false: nothing to train")
        return self

    @model_validator(mode="after")
    def _kind_settings(self) -> "NetworkSection":
        if self.factor == 0:
            raise ValueError("network.factor = 0: use -1 (the most balanced split) or a number that divides "
                             "the layer sizes, e.g. 8")
        if self.factor != -1 and self.type != "lokr":
            raise ValueError(f"network.factor applies to network.type = \"lokr\" only (this is \"{self.type}\"); "
                             "remove it or set network.type = \"lokr\"")
        if self.dropout and self.type in LYCORIS_TYPES:
            raise ValueError(f"network.dropout is LoRA's; LyCORIS {self.type} has no such dropout in Kiln: set "
                             "network.dropout = 0")
        return self

    @model_validator(mode="after")
    def _text_encoder_rates(self) -> "NetworkSection":
        rates = self.text_encoder_lr
        listed = rates if isinstance(rates, list) else [] if rates is None else [rates]
        if isinstance(rates, list) and not 1 <= len(rates) <= 2 or any(rate <= 0 for rate in listed):
            raise ValueError(f"network.text_encoder_lr = {rates}: give one rate > 0, or one per text encoder "
                             "(SDXL: [text_encoder, text_encoder_2], e.g. [1e-5, 5e-6])")
        return self

    @model_validator(mode="after")
    def _blockwise_and_lora_options(self) -> "NetworkSection":
        if problems := network_option_problems(self):
            raise ValueError("\n".join(problems))  # one bullet each
        return self


def network_option_problems(net: NetworkSection) -> list[str]:
    """Block-wise settings that do not parse or contradict the rest; options only LoRA has."""
    from library.networks.blocks import parse_floats, parse_ints, parse_weights

    problems = []
    parsers = {"down_lr_weight": lambda v: parse_weights(v, 12), "up_lr_weight": lambda v: parse_weights(v, 12),
               "mid_lr_weight": lambda v: parse_weights(v, 1, presets=False), "block_dims": parse_ints,
               "conv_block_dims": parse_ints, "block_alphas": parse_floats, "conv_block_alphas": parse_floats}
    for key, parse in parsers.items():
        try:
            values = parse(getattr(net, key)) or []
        except ValueError as err:
            problems.append(f"network.{key}: {err}")
            continue
        if any(v < 0 for v in values):
            problems.append(f"network.{key} has a negative value")
    for alphas, dims in (("block_alphas", "block_dims"), ("conv_block_alphas", "conv_block_dims")):
        if getattr(net, alphas) is not None and getattr(net, dims) is None:
            problems.append(f"network.{alphas} goes with network.{dims}: set both")
    if net.conv_block_dims is not None and not net.conv_rank:
        problems.append("network.conv_block_dims ranks the 3x3 convolutions, which are adapted only with "
                        "network.conv_rank > 0 (LoCon): set it")
    blockwise = [k for k in BLOCK_WEIGHT_KEYS + BLOCK_DIM_KEYS if getattr(net, k) is not None]
    if blockwise and not net.train_unet:
        problems.append(f"network.{blockwise[0]} sets UNet blocks, but network.train_unet = false")
    lora_only = [k for k in ("rank_dropout", "module_dropout", "scale_weight_norms") if getattr(net, k)]
    if lora_only and net.type != "lora":
        problems.append(f"{', '.join('network.' + k for k in lora_only)}: LoRA's (sd-scripts' networks.lora); "
                        f"Kiln's LyCORIS {net.type} has none: remove them or set network.type = \"lora\"")
    return problems


class LoraRunConfig(RunConfig):
    trainer_kind = "lora"
    network: NetworkSection = NetworkSection()


class LoraRecipe(Recipe):
    name = "lora"
    script = "train_lora.py"
    config_class = LoraRunConfig
    path_keys = (("network", "init_weights", "file"),)

    def environment_problems(self, data: dict) -> list[str]:
        return self._lokr_factor_problems(data) + self._text_encoder_rate_problems(data)

    def _text_encoder_rate_problems(self, data: dict) -> list[str]:
        rates, family = table(data, "network").get("text_encoder_lr"), model_family(data)
        if isinstance(rates, list) and family is not None and rates:
            try:
                text_encoder_rates([float(r) for r in rates if isinstance(r, (int, float))], 1.0, family)
            except ValueError as err:
                return [str(err)]
        return []

    def _lokr_factor_problems(self, data: dict) -> list[str]:
        """A LoKr factor must divide every adapted layer's sizes: checked from the model's configs, before the
        weights load (a .ckpt file, whose shapes need unpickling, is checked right after it loads)."""
        factor = value_of(data, "network", "factor", int, -1)
        path = value_of(data, "model", "path", str, "")
        if value_of(data, "network", "type", str) != "lokr" or factor <= 0 or not path:
            return []
        from library.models.skeleton import model_skeleton
        from library.networks.lokr import model_factor_problem
        from library.networks.targets import UNET_GROUP

        skeleton = model_skeleton(path, value_of(data, "model", "config_dir", str) or None)
        if skeleton is None:
            return []
        groups = {UNET_GROUP} if value_of(data, "network", "train_unet", bool, True) else set()
        if value_of(data, "network", "train_text_encoder", bool, True):
            groups |= {slot.group for slot in skeleton.family.text_encoders}
        conv = value_of(data, "network", "conv_rank", int, 0) > 0
        problem = model_factor_problem(skeleton, factor, groups, conv)
        return [problem] if problem else []

    def trained_parts(self, config: LoraRunConfig) -> frozenset[str]:
        return frozenset()  # the base model is frozen: only the network's own weights train (always fp32)

    def text_encoder_trained_by(self, config: LoraRunConfig) -> str | None:
        return "network.train_text_encoder" if config.network.train_text_encoder else None

    def optimizer_lrs(self, config: LoraRunConfig) -> dict[str, float]:
        """The groups' rates; with block lr weights one UNet group per block with a module (SD's 25 blocks:
        the check only needs the distinct rates, the run takes the model's own blocks)."""
        from library.networks.blocks import block_lr_weights

        net, lr = config.network, config.optimizer.lr
        lrs = {"unet": net.unet_lr or lr} if net.train_unet else {}
        weights = block_lr_weights((0, 12, 1, 12, 0), net.down_lr_weight, net.mid_lr_weight, net.up_lr_weight,
                                   net.block_lr_zero_threshold) if net.train_unet else None
        if weights is not None:
            lrs = {f"unet_block{i}": (net.unet_lr or lr) * w for i, w in enumerate(weights) if i and w > 0}
        if net.train_text_encoder:
            rates = net.text_encoder_lr if isinstance(net.text_encoder_lr, list) else [net.text_encoder_lr]
            for index, rate in enumerate(rates):  # one rate, or one per text encoder (SDXL)
                lrs["text_encoder" if index == 0 else f"text_encoder_{index + 1}"] = rate or lr
        return lrs

    def lr_settings(self, config: LoraRunConfig) -> list[str]:
        net = config.network
        parts = [part for part, on in (("unet", net.train_unet), ("text_encoder", net.train_text_encoder)) if on]
        return part_lr_settings("network", net, config.optimizer.lr, parts)

    def save_sizes(self, config: LoraRunConfig, header):
        from library.registry import canonical_optimizer_name
        from library.training.disk_space import SAVE_BYTES, SaveSizes, state_bytes

        sizes, net = header.sizes, config.network
        if not sizes or "unet" not in sizes:
            return None
        per_rank = sizes["unet"].adapter_io if net.train_unet else 0
        per_rank += sizes["text"].adapter_io if net.train_text_encoder and "text" in sizes else 0
        params = per_rank * net.rank + (sizes["unet"].conv_io * net.conv_rank if net.train_unet else 0)
        params *= 2 if net.type == "loha" else 1  # two factor pairs per layer
        return SaveSizes(params * SAVE_BYTES[config.save.precision],
                         state_bytes(params, canonical_optimizer_name(config.optimizer.name)))

    def model_problems(self, config: LoraRunConfig, header) -> list[str]:
        return block_problems(config.network, header.family) + self._init_weights_problems(config, header)

    def _init_weights_problems(self, config: LoraRunConfig, header) -> list[str]:
        from library.models.header import tensor_shapes
        from library.networks.compat import network_file_problem, read_network_metadata

        path = config.network.init_weights
        if not path:
            return []
        try:
            problem = network_file_problem(path, tensor_shapes(Path(path)), read_network_metadata(path), header)
        except Exception as err:  # noqa: BLE001 - an unreadable file is the problem to report
            problem = f"{path} is not a readable .safetensors LoRA file ({str(err).splitlines()[0]})"
        return [f"network.init_weights: {problem}"] if problem else []

    def build(self, parts, run) -> Built:
        # imported here: peft is slow to import and --help/--check never need it
        from library.networks.base import NetworkSpec
        from library.networks.kinds import kind_named
        from library.networks.metadata import training_metadata
        from library.networks.trainable import UNET_GROUP, NetworkTrainable

        config: LoraRunConfig = run.config
        net, lr = config.network, config.optimizer.lr
        lrs = {UNET_GROUP: net.unet_lr or lr} if net.train_unet else {}
        if net.train_text_encoder:
            lrs.update(text_encoder_rates(net.text_encoder_lr, lr, parts.family))
        kind = kind_named(net.type)
        spec = NetworkSpec(net.rank, net.alpha, net.conv_rank, net.conv_alpha, net.dropout, net.factor,
                           rank_dropout=net.rank_dropout, module_dropout=net.module_dropout)
        network = kind.metadata(spec)
        network["ss_network_args"] = json.dumps({**json.loads(network["ss_network_args"]), **block_args(net)})
        network["ss_scale_weight_norms"] = str(net.scale_weight_norms) if net.scale_weight_norms else "None"
        metadata = training_metadata(run, parts, lrs, network)
        blocks = block_settings(net, parts.family)
        trainable = NetworkTrainable(parts, kind, spec, lrs, config.train.seed, run.save_dtype, metadata, blocks,
                                     net.scale_weight_norms)
        lines = [trainable.start_from(net.init_weights)] if net.init_weights else []
        return Built(trainable, lines=lines + [trainable.describe()] + block_lines(blocks, parts.family))


def block_args(net: NetworkSection) -> dict[str, str]:
    """The block-wise keys as sd-scripts records them in ss_network_args (strings, lists comma-joined)."""
    args = {}
    for key in BLOCK_WEIGHT_KEYS + BLOCK_DIM_KEYS + ("block_lr_zero_threshold",):
        value = getattr(net, key)
        if key == "block_lr_zero_threshold":
            value = value or None
        if value is not None:
            args[key] = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    return args


def block_problems(net: NetworkSection, family) -> list[str]:
    """Block-wise lists that do not fit the model's UNet blocks, or a family without them."""
    from library.networks.blocks import count_problems, parse_floats, parse_ints

    used = [k for k in BLOCK_WEIGHT_KEYS + BLOCK_DIM_KEYS if getattr(net, k) is not None]
    if not used:
        return []
    if family.unet_block_layout is None:
        return [f"network.{used[0]}: block-wise settings are not available for {family.label} models"]
    lists = {key: (parse_ints if "dims" in key else parse_floats)(getattr(net, key)) for key in BLOCK_DIM_KEYS}
    return count_problems(family.unet_block_names(), lists)


def block_settings(net: NetworkSection, family):
    """The block-wise keys resolved for the model's blocks, or None when none is set."""
    from library.networks.blocks import BlockSettings, block_lr_weights, parse_floats, parse_ints

    if all(getattr(net, k) is None for k in BLOCK_WEIGHT_KEYS + BLOCK_DIM_KEYS):
        return None
    weights = block_lr_weights(family.unet_block_layout, net.down_lr_weight, net.mid_lr_weight, net.up_lr_weight,
                               net.block_lr_zero_threshold)

    def tupled(values):
        return tuple(values) if values is not None else None

    return BlockSettings(tupled(weights), tupled(parse_ints(net.block_dims)), tupled(parse_floats(net.block_alphas)),
                         tupled(parse_ints(net.conv_block_dims)), tupled(parse_floats(net.conv_block_alphas)))


def block_lines(blocks, family) -> list[str]:
    """What the block-wise settings do, for the run summary: each block that differs from the plain network."""
    if blocks is None:
        return []
    names, lines = family.unet_block_names(), []
    if blocks.lr_weights is not None:
        shown = [f"{names[i]} {w:g}" for i, w in enumerate(blocks.lr_weights) if w != 1.0]
        lines.append("block lr weights (others 1; 0 = no modules): " + (", ".join(shown) or "all 1"))
    for label, dims in (("ranks", blocks.dims), ("conv ranks", blocks.conv_dims)):
        if dims is not None:
            lines.append(f"block {label}: " + ", ".join(f"{n} {d}" for n, d in zip(names, dims)))
    return lines


def text_encoder_rates(value: float | list[float] | None, default: float, family) -> dict[str, float]:
    """{group: rate} per text encoder from network.text_encoder_lr (one rate for all, or one each).
    ValueError when a list does not have one rate per encoder of this model."""
    slots = family.text_encoders
    rates = value if isinstance(value, list) else [default if value is None else value]
    if len(rates) == 1:
        rates = rates * len(slots)
    if len(rates) != len(slots):
        raise ValueError(f"network.text_encoder_lr has {len(rates)} rates but this {family.label} model has "
                         f"{len(slots)} text encoder(s): give one rate, or one per encoder")
    return {slot.group: rate for slot, rate in zip(slots, rates)}


RECIPE = LoraRecipe()
