"""train_lora.py's recipe: a network (network.type; LoRA/LoCon today) on the UNet and/or text encoders, saved
in the kohya layout with sd-scripts' metadata."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from library.config.schema import RunConfig, Section
from library.recipes.base import Built, Recipe, model_family, table


class NetworkSection(Section):
    type: Literal["lora"] = "lora"  # the network kind (library/networks/kinds.py); LoCon = lora with conv_rank
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(8.0, gt=0)
    conv_rank: int = Field(0, ge=0, le=1024)  # 0 = no conv layers; >0 = LoCon
    conv_alpha: float = Field(1.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    train_unet: bool = True
    train_text_encoder: bool = True
    unet_lr: float | None = Field(None, gt=0)  # None = optimizer.lr
    # one rate for every text encoder, or one per encoder: SDXL [text_encoder, text_encoder_2]; None = optimizer.lr
    text_encoder_lr: float | list[float] | None = None
    init_weights: str = ""  # start from an existing network file of the same kind

    @model_validator(mode="after")
    def _something_to_train(self) -> "NetworkSection":
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError("network.train_unet and network.train_text_encoder are both false: nothing to train")
        return self

    @model_validator(mode="after")
    def _text_encoder_rates(self) -> "NetworkSection":
        rates = self.text_encoder_lr
        listed = rates if isinstance(rates, list) else [] if rates is None else [rates]
        if isinstance(rates, list) and not 1 <= len(rates) <= 2 or any(rate <= 0 for rate in listed):
            raise ValueError(f"network.text_encoder_lr = {rates}: give one rate > 0, or one per text encoder "
                             "(SDXL: [text_encoder, text_encoder_2], e.g. [1e-5, 5e-6])")
        return self


class LoraRunConfig(RunConfig):
    network: NetworkSection = NetworkSection()


class LoraRecipe(Recipe):
    name = "lora"
    config_class = LoraRunConfig
    path_keys = (("network", "init_weights", "file"),)

    def environment_problems(self, data: dict) -> list[str]:
        rates, family = table(data, "network").get("text_encoder_lr"), model_family(data)
        if isinstance(rates, list) and family is not None and rates:
            try:
                text_encoder_rates([float(r) for r in rates if isinstance(r, (int, float))], 1.0, family)
            except ValueError as err:
                return [str(err)]
        return []

    def text_encoder_trained_by(self, config: LoraRunConfig) -> str | None:
        return "network.train_text_encoder" if config.network.train_text_encoder else None

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
        spec = NetworkSpec(net.rank, net.alpha, net.conv_rank, net.conv_alpha, net.dropout)
        metadata = training_metadata(config, parts, run.scan, run.plan, run.warmup_steps, lrs, kind.metadata(spec))
        trainable = NetworkTrainable(parts, kind, spec, lrs, config.train.seed, run.save_dtype, metadata)
        lines = [trainable.start_from(net.init_weights)] if net.init_weights else []
        return Built(trainable, lines=lines + [trainable.describe()])


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
