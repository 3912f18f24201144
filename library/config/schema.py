"""The sections every trainer shares, as a pure pydantic schema.

Section models forbid unknown keys: a misspelt key is an error with a "did you mean", never silently ignored.
Validators here only compare values with each other; checks that need the file system, a registry or a
tokenizer run in the run step (library/recipes/checks.py). A trainer's own sections live in its recipe.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from library.config.trainers import TRAINER_SCRIPTS, wrong_trainer_message


class Section(BaseModel):
    # strict: TOML has real types, so `lr = true` or `lr = "1e-4"` is a mistake, never read as 1.0 or 0.0001
    # (ints are still taken where a float is expected: `lr = 1` is fine)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class ModelSection(Section):
    path: str = Field(description='"builtin:tiny-sd15", a diffusers folder, or a .safetensors/.ckpt file')
    v_parameterization: Literal["auto"] | bool = "auto"
    config_dir: str = ""  # diffusers config folder for a single-file model of an unusual shape
    clip_skip: int = Field(1, ge=1, le=12)


class SubsetSection(Section):
    image_dir: str
    repeats: int = Field(1, ge=1)
    class_tokens: str = ""
    is_reg: bool = False
    caption_extension: str = ""  # empty = dataset.caption_extension
    caption_prefix: str | None = None  # None = dataset.caption_prefix
    caption_suffix: str | None = None
    loss_weight: float = Field(1.0, ge=0)  # multiplies each of its images' loss (OneTrainer's concept loss_weight)
    # loss masks (library/data/masks.py); None = the dataset's setting for training folders, off for reg folders
    masked_loss: bool | None = None
    alpha_mask: bool | None = None
    mask_dir: str = ""  # this folder's masks, named like the images (sd-scripts' conditioning_data_dir)


class DatasetSection(Section):
    train_dir: str = ""
    reg_dir: str = ""
    subsets: list[SubsetSection] = []
    prior_loss_weight: float = Field(1.0, ge=0)
    resolution: int = Field(512, ge=64, le=4096, multiple_of=8)
    caption_extension: str = ".txt"
    caption_prefix: str = ""
    caption_suffix: str = ""
    shuffle_caption: bool = False
    keep_tokens: int = Field(0, ge=0)
    caption_dropout_rate: float = Field(0.0, ge=0, le=1)
    caption_tag_dropout_rate: float = Field(0.0, ge=0, le=1)
    keep_tokens_separator: str = ""  # e.g. "|||": tags before it are kept in place, after a second one too
    secondary_separator: str = ""  # e.g. ";;;": joins tags that shuffle and drop as one
    enable_wildcard: bool = False  # {a|b|c} in captions: one option picked per sample
    flip_aug: bool = False
    random_crop: bool = False
    color_aug: bool = False  # sd-scripts' hue/gamma jitter; needs cache_latents = "off"
    face_crop_aug_range: list[float] | None = Field(None, min_length=2, max_length=2)  # [lo, hi], files *_cx_cy_w_h
    skip_bad_images: bool = False
    # loss masks for the training folders (library/data/masks.py): white trains, black is ignored
    masked_loss: bool = False  # a mask per image: <stem>.mask.png beside it, or in mask_dir
    mask_dir: str = ""  # masks named like the images, in the same NN_name folders
    alpha_mask: bool = False  # the images' own alpha channel is the mask
    # aspect-ratio buckets (library/buckets.py)
    enable_buckets: bool = False
    min_bucket_reso: int = Field(0, ge=0, le=8192)  # 0 = resolution / 2
    max_bucket_reso: int = Field(0, ge=0, le=8192)  # 0 = resolution * 2
    bucket_reso_steps: int = Field(64, ge=8, le=256, multiple_of=8)  # 64 is safe everywhere; SD1/2 take 32
    bucket_no_upscale: bool = False
    # latent and text-encoder caches (library/latent_cache.py)
    cache_latents: Literal["memory", "disk", "off"] = "memory"
    cache_dir: str = ""  # disk cache folder; "" = <train_dir>/.kiln-cache
    vae_batch_size: int = Field(1, ge=1, le=256)
    cache_text_encoder_outputs: bool = False

    @model_validator(mode="after")
    def _has_training_images(self) -> "DatasetSection":
        if not self.train_dir and not any(not subset.is_reg for subset in self.subsets):
            raise ValueError("dataset: no training images configured: set dataset.train_dir or add "
                             "[[dataset.subsets]]")
        return self

    @model_validator(mode="after")
    def _crop_needs_fresh_latents(self) -> "DatasetSection":
        if self.random_crop and self.cache_latents != "off":
            raise ValueError("dataset.random_crop changes the crop every step, so cached latents would be stale: "
                             "set dataset.cache_latents = 'off' or dataset.random_crop = false")
        return self

    @model_validator(mode="after")
    def _augmentation_and_masks(self) -> "DatasetSection":
        from library.config.options import dataset_option_problems

        if problems := dataset_option_problems(self):
            raise ValueError("\n".join(problems))  # one bullet each
        return self

    @model_validator(mode="after")
    def _bucket_range(self) -> "DatasetSection":
        if not self.enable_buckets:
            return self
        step, problems = self.bucket_reso_steps, []
        for key in ("min_bucket_reso", "max_bucket_reso"):
            value = getattr(self, key)
            if value and (value % step or value < step):
                problems.append(f"dataset.{key} = {value} is not a multiple of dataset.bucket_reso_steps = {step}")
        if self.min_bucket_reso and self.min_bucket_reso > self.resolution:
            problems.append(f"dataset.min_bucket_reso = {self.min_bucket_reso} is above dataset.resolution = "
                            f"{self.resolution}")
        if self.max_bucket_reso and self.max_bucket_reso < self.resolution:
            problems.append(f"dataset.max_bucket_reso = {self.max_bucket_reso} is below dataset.resolution = "
                            f"{self.resolution}")
        if step > self.resolution:
            problems.append(f"dataset.bucket_reso_steps = {step} is larger than dataset.resolution = {self.resolution}")
        if problems:
            raise ValueError("\n".join(problems))  # one bullet each
        return self

    @model_validator(mode="after")
    def _fixed_captions_for_text_cache(self) -> "DatasetSection":
        if not self.cache_text_encoder_outputs:
            return self
        varying = [f"dataset.{key}" for key, on in (("shuffle_caption", self.shuffle_caption),
                                                    ("caption_dropout_rate", self.caption_dropout_rate > 0),
                                                    ("caption_tag_dropout_rate", self.caption_tag_dropout_rate > 0),
                                                    ("enable_wildcard", self.enable_wildcard))
                   if on]
        if varying:
            raise ValueError(f"dataset.cache_text_encoder_outputs = true needs captions that never change, but "
                             f"{' and '.join(varying)} vary them every step: turn those off or set "
                             "dataset.cache_text_encoder_outputs = false")
        return self


class OptimizerSection(Section):
    name: str = "AdamW"
    lr: float = Field(1e-4, gt=0)
    args: dict[str, Any] = {}
    scheduler: str = "constant"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    num_cycles: int = Field(1, ge=1)
    power: float = Field(1.0, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 = no clipping
    fused_backward_pass: bool = False  # Adafactor: each tensor steps as its gradient is ready (sd-scripts')

    @model_validator(mode="after")
    def _one_warmup(self) -> "OptimizerSection":
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("optimizer.warmup_steps and optimizer.warmup_ratio are both set: keep one")
        return self


class TrainSection(Section):
    max_steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 42
    # noise and timesteps (library/training/noise.py), each as the sd-scripts option of the same name
    noise_offset: float = Field(0.0, ge=0, le=1)
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float = Field(0.0, ge=0)
    multires_noise_iterations: int = Field(0, ge=0, le=64)  # 0 = off; 6-10 usual
    multires_noise_discount: float = Field(0.3, gt=0, le=1)
    ip_noise_gamma: float = Field(0.0, ge=0, le=1)  # 0 = off; ~0.1 usual
    ip_noise_gamma_random_strength: bool = False
    zero_terminal_snr: bool = False
    min_timestep: int = Field(0, ge=0, le=999)
    max_timestep: int = Field(1000, ge=1, le=1000)  # exclusive
    # the loss (library/training/loss.py)
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = "l2"
    huber_schedule: Literal["constant", "exponential", "snr"] = "snr"
    huber_c: float = Field(0.1, gt=0, le=1)
    huber_scale: float = Field(1.0, gt=0)
    min_snr_gamma: float = Field(0.0, ge=0)  # 0 = off
    debiased_estimation_loss: bool = False
    v_pred_like_loss: float = Field(0.0, ge=0)  # ε models only
    scale_v_pred_loss_like_noise_pred: bool = False  # v models only
    # trained weights and optimizer state in half precision (library/training/precision.py)
    full_bf16: bool = False
    full_fp16: bool = False
    max_token_length: Literal[75, 150, 225] = 75  # caption tokens the text encoder reads (sd-scripts' option)
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    # speed options, off by default (each measured both ways in docs/BENCHMARKS.md)
    channels_last: bool = False  # the UNet's convolutions in channels-last memory layout
    torch_compile: bool = False  # torch.compile the UNet (sd-scripts' --torch_compile)
    dynamo_backend: Literal["inductor", "aot_eager", "eager", "cudagraphs"] = "inductor"  # for torch_compile
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N" (GPU number N) or "mps"
    num_threads: int = Field(0, ge=0)  # 0 = torch default
    nan_policy: Literal["stop", "skip"] = "stop"  # a NaN/inf loss stops the run, or skips its batch
    nan_skip_limit: int = Field(10, ge=1)  # with "skip": batches skipped before the run stops anyway

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"train.device = {value!r} is not a device: use 'auto', 'cpu', 'cuda', 'cuda:N' (N: the "
                             "GPU's number, e.g. cuda:1) or 'mps'")
        return value

    @model_validator(mode="after")
    def _one_length(self) -> "TrainSection":
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.max_steps and train.epochs")
        return self

    @model_validator(mode="after")
    def _options(self) -> "TrainSection":
        from library.config.options import train_option_problems

        if problems := train_option_problems(self):
            raise ValueError("\n".join(problems))  # one bullet each
        return self


class SaveSection(Section):
    output_dir: str = "output"
    name: str = Field("lora", pattern=r"^[^./\\:*?\"<>|][^/\\:*?\"<>|]*$")  # no path, not hidden
    every_n_epochs: int = Field(0, ge=0)
    every_n_steps: int = Field(0, ge=0)
    keep_last: int = Field(0, ge=0)  # 0 = keep every intermediate file
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    save_state: bool = False  # also write a resumable state beside intermediate saves
    overwrite: bool = False
    resume: str = ""  # a state folder written by an earlier run


class LoggingSection(Section):
    log_dir: str = "logs"


class EmaSection(Section):
    """An exponential moving average of the trained weights (library/training/ema.py; OneTrainer's EMA)."""

    enabled: bool = False
    decay: float = Field(0.999, gt=0, lt=1)
    update_interval: int = Field(5, ge=1)  # update every N optimizer steps (OneTrainer's default 5)
    warmup: bool = True  # decay min((1 + step) / (10 + step), decay), as OneTrainer
    device: Literal["train", "cpu"] = "train"  # "cpu" keeps the average in CPU memory (saves GPU memory)
    save_as: Literal["result", "beside"] = "result"  # the saved files hold it, or <name>-ema.<ext> beside them


class SampleSection(Section):
    """Preview images during training (library/sampling.py): kohya prompt lines, inline or from a file."""

    prompts: list[str] = []  # kohya lines: "a dog --n blurry --w 512 --h 512 --s 20 --l 7 --d 1 --ss euler_a"
    prompt_file: str = ""  # one such line per line; '#' starts a comment line
    every_n_steps: int = Field(0, ge=0)  # 0 = off
    every_n_epochs: int = Field(0, ge=0)
    before_training: bool = False
    sampler: str = "euler_a"  # euler_a, euler, ddim, dpm++ 2m, dpm++ 2m karras
    negative_prompt: str = ""
    width: int = Field(0, ge=0, multiple_of=8)  # 0 = dataset.resolution
    height: int = Field(0, ge=0, multiple_of=8)
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0)
    seed: int | None = None  # prompt i uses seed + i unless its line has --d; None = train.seed


def fill_defaults(data: Any, defaults: dict[tuple[str, str], Any]) -> Any:
    """A trainer's own defaults, set before validation where the file leaves {(section, key): value} out, so an
    explicit value always wins and --print-config round-trips. Non-table sections are left for the schema."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for (section, key), value in defaults.items():
        table = data.get(section, {})
        if isinstance(table, dict):
            data[section] = {key: value, **table}
    return data


class RunConfig(Section):
    """Sections every trainer shares, and the optional top-level `trainer` key that names the script a config
    is for (the run queue reads it; a trainer refuses another trainer's config)."""

    trainer_kind: ClassVar[str | None] = None  # set by each trainer's config class
    trainer: str | None = None  # a key of TRAINER_SCRIPTS: "lora", "textual_inversion", "dreambooth", ...
    model: ModelSection
    dataset: DatasetSection
    optimizer: OptimizerSection = OptimizerSection()
    train: TrainSection
    save: SaveSection = SaveSection()
    logging: LoggingSection = LoggingSection()
    sample: SampleSection = SampleSection()
    ema: EmaSection = EmaSection()

    @field_validator("trainer")
    @classmethod
    def _this_trainer(cls, value: str | None) -> str | None:
        if value is None:
            return value
        expected = cls.trainer_kind
        if value not in TRAINER_SCRIPTS or (expected is not None and value != expected):
            raise ValueError(wrong_trainer_message(value, expected or value))
        return value

    @model_validator(mode="after")
    def _across_sections(self) -> "RunConfig":
        from library.config.options import run_option_problems

        if problems := run_option_problems(self):
            raise ValueError("\n".join(problems))  # one bullet each
        return self
