"""train_dreambooth.py's recipe: a full fine-tune of the UNet (and optionally the text encoders) with prior
preservation; missing class images are generated with the base model before the dataset scan."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from library.config.schema import RunConfig, Section, fill_defaults
from library.recipes.base import Built, Recipe, part_lr_settings, value_of


class DreamBoothSection(Section):
    """What a DreamBooth run fine-tunes, its class (prior-preservation) images, and the model file it writes."""

    train_text_encoder: bool = False
    stop_text_encoder_training: int = Field(0, ge=0)  # freeze the text encoder after this step; 0 = never
    unet_lr: float | None = Field(None, gt=0)  # None = optimizer.lr
    text_encoder_lr: float | None = Field(None, gt=0)
    # class images: kept in class_dir (named NN_name, like any reg folder); missing ones are generated
    class_dir: str = ""
    class_prompt: str = ""  # generates class images; also written as their captions
    num_class_images: int = Field(0, ge=0)  # 0 = generate none
    class_negative_prompt: str = ""
    class_sampling_steps: int = Field(30, ge=1, le=1000)
    class_guidance_scale: float = Field(7.5, ge=0)
    class_batch_size: int = Field(1, ge=1, le=256)
    save_format: Literal["single_file", "diffusers"] = "single_file"


class DreamBoothRunConfig(RunConfig):
    """train_dreambooth.py. Defaults differ where a whole-model fine-tune needs it: lr 2e-6 (sd-scripts'
    DreamBooth default; 1e-4 wrecks a full model), files named "dreambooth"."""

    trainer_kind = "dreambooth"

    dreambooth: DreamBoothSection = DreamBoothSection()

    @model_validator(mode="before")
    @classmethod
    def _dreambooth_defaults(cls, data: Any) -> Any:
        return fill_defaults(data, {("save", "name"): "dreambooth", ("optimizer", "lr"): 2e-6})

    @model_validator(mode="after")
    def _dreambooth_rules(self) -> "DreamBoothRunConfig":
        if problems := _dreambooth_problems(self):
            raise ValueError("\n".join(problems))  # one bullet each
        return self


def _dreambooth_problems(config: DreamBoothRunConfig) -> list[str]:
    db, problems = config.dreambooth, []
    if db.stop_text_encoder_training and not db.train_text_encoder:
        problems.append("dreambooth.stop_text_encoder_training is set but dreambooth.train_text_encoder = false: "
                        "turn text-encoder training on or set stop_text_encoder_training = 0")
    if db.text_encoder_lr is not None and not db.train_text_encoder:
        problems.append("dreambooth.text_encoder_lr is set but dreambooth.train_text_encoder = false")
    if db.save_format == "diffusers" and "." in config.save.name:
        problems.append(f"save.name = {config.save.name!r}: diffusers folders are named after save.name, which "
                        "must then have no '.'")
    if db.num_class_images:
        if not db.class_prompt.strip():
            problems.append(f"dreambooth.num_class_images = {db.num_class_images} needs dreambooth.class_prompt "
                            "(e.g. \"a photo of a dog\") to generate the missing class images")
        if not db.class_dir:
            problems.append(f"dreambooth.num_class_images = {db.num_class_images} needs dreambooth.class_dir: "
                            "the folder (named like 1_dog) that holds and receives the class images")
    return problems


class DreamBoothRecipe(Recipe):
    name = "dreambooth"
    script = "train_dreambooth.py"
    config_class = DreamBoothRunConfig
    saves_base_model = True

    def environment_problems(self, data: dict) -> list[str]:
        from library.data.folders import parse_folder_name

        class_dir = value_of(data, "dreambooth", "class_dir", str, "")
        if not class_dir:
            return []
        folder = Path(class_dir).expanduser()
        if parse_folder_name(folder.name) is None:
            return [f"dreambooth.class_dir {class_dir!r}: name the folder NN_name like any reg folder, e.g. "
                    f"{(folder.parent / ('1_' + folder.name)).as_posix()!r} (1 repeat per epoch)"]
        if not value_of(data, "dreambooth", "num_class_images", int, 0) and not folder.is_dir():
            return [f"dreambooth.class_dir: folder not found: {class_dir} (with num_class_images = 0 no class "
                    "images are generated)"]
        return []

    def optimizer_lrs(self, config: DreamBoothRunConfig) -> dict[str, float]:
        db, lr = config.dreambooth, config.optimizer.lr
        lrs = {"unet": db.unet_lr or lr}
        if db.train_text_encoder:
            lrs["text_encoder"] = db.text_encoder_lr or lr
        return lrs

    def lr_settings(self, config: DreamBoothRunConfig) -> list[str]:
        return part_lr_settings("dreambooth", config.dreambooth, config.optimizer.lr, list(self.optimizer_lrs(config)))

    def save_sizes(self, config: DreamBoothRunConfig, header):
        from library.registry import canonical_optimizer_name
        from library.training.disk_space import SAVE_BYTES, SaveSizes, state_bytes

        sizes = header.sizes
        if not sizes or "unet" not in sizes:
            return None
        trained = sizes["unet"].params + (sizes["text"].params if config.dreambooth.train_text_encoder else 0)
        whole = sum(size.params for size in sizes.values())
        return SaveSizes(whole * SAVE_BYTES[config.save.precision],
                         state_bytes(trained, canonical_optimizer_name(config.optimizer.name)))

    def trained_parts(self, config: DreamBoothRunConfig) -> frozenset[str]:
        return frozenset({"unet", "text_encoders"} if config.dreambooth.train_text_encoder else {"unet"})

    def text_encoder_trained_by(self, config: DreamBoothRunConfig) -> str | None:
        return "dreambooth.train_text_encoder" if config.dreambooth.train_text_encoder else None

    def before_scan(self, config: DreamBoothRunConfig, check_only: bool, load_model) -> None:
        """Generate the missing class images, so they join the run as regularisation images."""
        from library.recipes.class_images import class_image_status, generate_class_images

        status = class_image_status(config)
        if status is None:
            return
        print(status.line())
        if status.missing and not check_only:
            from library.recipes.resolve import scan_dataset

            scan_dataset(config.dataset, captionless=self.captionless)  # the user's images first, before a
            # model loads to generate class images: a bad dataset is still reported in a second
            written = generate_class_images(load_model(), config, status)
            print(f"class images: wrote {len(written)} to {status.folder}")

    def extra_subsets(self, config: DreamBoothRunConfig) -> list:
        """dreambooth.class_dir as a reg folder, unless reg_dir or a reg subset already holds it."""
        from library.data.folders import Subset, parse_folder_name

        db, ds = config.dreambooth, config.dataset
        folder = Path(db.class_dir).expanduser() if db.class_dir else None
        if folder is None or not folder.is_dir():
            return []
        resolved = folder.resolve()
        covered = (ds.reg_dir and Path(ds.reg_dir).resolve() == resolved.parent) or any(
            s.is_reg and Path(s.image_dir).resolve() == resolved for s in ds.subsets)
        if covered:
            return []
        repeats, tokens = parse_folder_name(folder.name)
        return [Subset(folder, repeats, tokens, True, ds.caption_extension)]

    def build(self, parts, run) -> Built:
        from library.training.full_model import FullModelTrainable, StopTextEncoderHooks

        config: DreamBoothRunConfig = run.config
        db, lr = config.dreambooth, config.optimizer.lr
        suffix = ".safetensors" if db.save_format == "single_file" else ""
        trainable = FullModelTrainable(parts, db.unet_lr or lr, (db.text_encoder_lr or lr) if db.train_text_encoder
                                       else None, db.stop_text_encoder_training, suffix, run.save_dtype)
        line = f"{trainable.describe('DreamBooth')} ({config.save.precision})"
        return Built(trainable, StopTextEncoderHooks(trainable), lines=[line])


RECIPE = DreamBoothRecipe()
