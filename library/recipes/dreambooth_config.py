"""The [dreambooth] section of train_dreambooth.py and its run config (prior preservation, class images)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from library.config.schema import RunConfig, Section, SubsetSection, fill_defaults


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

    dreambooth: DreamBoothSection = DreamBoothSection()

    @model_validator(mode="before")
    @classmethod
    def _dreambooth_defaults(cls, data: Any) -> Any:
        return fill_defaults(data, {("save", "name"): "dreambooth", ("optimizer", "lr"): 2e-6})

    @model_validator(mode="after")
    def _dreambooth_rules(self) -> "DreamBoothRunConfig":
        problems = _dreambooth_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        _add_class_dir_subset(self)
        return self


def _dreambooth_problems(config: DreamBoothRunConfig) -> list[str]:
    db, problems = config.dreambooth, []
    if db.stop_text_encoder_training and not db.train_text_encoder:
        problems.append("dreambooth.stop_text_encoder_training is set but dreambooth.train_text_encoder = false: "
                        "turn text-encoder training on or set stop_text_encoder_training = 0")
    if db.text_encoder_lr is not None and not db.train_text_encoder:
        problems.append("dreambooth.text_encoder_lr is set but dreambooth.train_text_encoder = false")
    if config.dataset.cache_text_encoder_outputs and db.train_text_encoder:
        problems.append("dataset.cache_text_encoder_outputs = true, but dreambooth.train_text_encoder = true "
                        "changes the text encoder's outputs: turn one of them off")
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
    if db.class_dir:
        from library.data.folders import parse_folder_name

        folder = Path(db.class_dir).expanduser()
        if parse_folder_name(folder.name) is None:
            problems.append(f"dreambooth.class_dir {db.class_dir!r}: name the folder NN_name like any reg folder, "
                            f"e.g. {(folder.parent / ('1_' + folder.name)).as_posix()!r} (1 repeat per epoch)")
        elif not db.num_class_images and not folder.is_dir():
            problems.append(f"dreambooth.class_dir: folder not found: {db.class_dir} (with num_class_images = 0 "
                            "no class images are generated)")
    return problems


def _add_class_dir_subset(config: DreamBoothRunConfig) -> None:
    """Make an existing class_dir part of the run as a reg folder, unless reg_dir or a reg subset already holds
    it. A folder still to be generated joins when the trainer re-reads the config after generating."""
    from library.data.folders import parse_folder_name

    db, ds = config.dreambooth, config.dataset
    if not db.class_dir:
        return
    folder = Path(db.class_dir).expanduser()
    if not folder.is_dir():
        return
    resolved = folder.resolve()
    covered = (ds.reg_dir and Path(ds.reg_dir).resolve() == resolved.parent) or any(
        s.is_reg and Path(s.image_dir).resolve() == resolved for s in ds.subsets)
    if covered:
        return
    repeats, tokens = parse_folder_name(folder.name)
    ds.subsets = [*ds.subsets, SubsetSection(image_dir=str(folder), repeats=repeats, class_tokens=tokens,
                                             is_reg=True)]
