"""train_lora.py's recipe: a network (network.type: LoRA/LoCon, LyCORIS LoHa or LoKr) on the UNet and/or text
encoders, saved in the kohya/LyCORIS layout with sd-scripts' metadata."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from library.config.schema import RunConfig, Section
from library.recipes.base import Built, Recipe, part_lr_settings, value_of

LYCORIS_TYPES = ("loha", "lokr")


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
    text_encoder_lr: float | None = Field(None, gt=0)
    init_weights: str = ""  # start from an existing network file of the same kind

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


class LoraRunConfig(RunConfig):
    trainer_kind = "lora"
    network: NetworkSection = NetworkSection()


class LoraRecipe(Recipe):
    name = "lora"
    script = "train_lora.py"
    config_class = LoraRunConfig
    path_keys = (("network", "init_weights", "file"),)

    def environment_problems(self, data: dict) -> list[str]:
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
        net, lr = config.network, config.optimizer.lr
        lrs = {"unet": net.unet_lr or lr} if net.train_unet else {}
        if net.train_text_encoder:
            lrs["text_encoder"] = net.text_encoder_lr or lr
        return lrs

    def lr_settings(self, config: LoraRunConfig) -> list[str]:
        return part_lr_settings("network", config.network, config.optimizer.lr, list(self.optimizer_lrs(config)))

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
            lrs.update({slot.group: net.text_encoder_lr or lr for slot in parts.family.text_encoders})
        kind = kind_named(net.type)
        spec = NetworkSpec(net.rank, net.alpha, net.conv_rank, net.conv_alpha, net.dropout, net.factor)
        metadata = training_metadata(run, parts, lrs, kind.metadata(spec))
        trainable = NetworkTrainable(parts, kind, spec, lrs, config.train.seed, run.save_dtype, metadata)
        lines = [trainable.start_from(net.init_weights)] if net.init_weights else []
        return Built(trainable, lines=lines + [trainable.describe()])


RECIPE = LoraRecipe()
