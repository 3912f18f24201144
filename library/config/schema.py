"""Run configuration: TOML file + `section.key=value` overrides → one validated, typed config.

Every problem is collected and reported together, each with its TOML location, before any model loads.
Section models forbid unknown keys: a misspelt key is an error with a "did you mean", never silently ignored.
"""
from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """All problems found in one config, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the config:\n{lines}")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    flip_aug: bool = False
    random_crop: bool = False
    skip_bad_images: bool = False
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
    def _crop_needs_fresh_latents(self) -> "DatasetSection":
        if self.random_crop and self.cache_latents != "off":
            raise ValueError("dataset.random_crop changes the crop every step, so cached latents would be stale: "
                             "set dataset.cache_latents = 'off' or dataset.random_crop = false")
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
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _fixed_captions_for_text_cache(self) -> "DatasetSection":
        if not self.cache_text_encoder_outputs:
            return self
        varying = [f"dataset.{key}" for key, on in (("shuffle_caption", self.shuffle_caption),
                                                    ("caption_dropout_rate", self.caption_dropout_rate > 0),
                                                    ("caption_tag_dropout_rate", self.caption_tag_dropout_rate > 0))
                   if on]
        if varying:
            raise ValueError(f"dataset.cache_text_encoder_outputs = true needs captions that never change, but "
                             f"{' and '.join(varying)} vary them every step: turn those off or set "
                             "dataset.cache_text_encoder_outputs = false")
        return self


class NetworkSection(Section):
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(8.0, gt=0)
    conv_rank: int = Field(0, ge=0, le=1024)  # 0 = no conv layers; >0 = LoCon
    conv_alpha: float = Field(1.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    train_unet: bool = True
    train_text_encoder: bool = True
    unet_lr: float | None = Field(None, gt=0)  # None = optimizer.lr
    text_encoder_lr: float | None = Field(None, gt=0)
    init_weights: str = ""  # start from an existing kohya LoRA file

    @model_validator(mode="after")
    def _something_to_train(self) -> "NetworkSection":
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError("network.train_unet and network.train_text_encoder are both false: nothing to train")
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


class TrainSection(Section):
    max_steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 42
    noise_offset: float = Field(0.0, ge=0, le=1)
    min_snr_gamma: float = Field(0.0, ge=0)  # 0 = off
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    num_threads: int = Field(0, ge=0)  # 0 = torch default

    @model_validator(mode="after")
    def _one_length(self) -> "TrainSection":
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.max_steps and train.epochs")
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

    @model_validator(mode="after")
    def _usable(self) -> "SampleSection":
        from library.sampling.prompt_file import PromptError, canonical_sampler, parse_prompt_lines, read_prompt_file

        problems = []
        try:
            canonical_sampler(self.sampler)
        except ValueError as err:
            problems.append(f"sample.sampler: {err}")
        count = 0
        try:
            count = len(parse_prompt_lines(list(self.prompts), "sample.prompts"))
            if self.prompt_file:
                count += len(read_prompt_file(self.prompt_file))
        except (PromptError, ValueError) as err:
            problems.append(str(err))
        scheduled = self.every_n_steps or self.every_n_epochs or self.before_training
        if scheduled and not count and not problems:
            problems.append("sample.every_n_steps / every_n_epochs / before_training ask for previews but there "
                            "are no prompts: set sample.prompts or sample.prompt_file")
        if problems:
            raise ValueError("; ".join(problems))
        return self


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
    """Sections every trainer shares."""

    model: ModelSection
    dataset: DatasetSection
    optimizer: OptimizerSection = OptimizerSection()
    train: TrainSection
    save: SaveSection = SaveSection()
    logging: LoggingSection = LoggingSection()
    sample: SampleSection = SampleSection()


class LoraRunConfig(RunConfig):
    network: NetworkSection = NetworkSection()


# ---------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=100` → (["train", "max_steps"], 100). Values are TOML literals; bare words are strings."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    keys = [k.strip() for k in key.strip().split(".")]
    if len(keys) < 2 or not all(keys):
        raise ValueError(f"override {text!r}: the key must name a section and a key, like train.max_steps=100")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return keys, value


# Keys where setting one on the command line replaces the other from the file (steps vs epochs).
EXCLUSIVE_KEYS = {("train", "max_steps"): ("train", "epochs"), ("train", "epochs"): ("train", "max_steps")}


def apply_overrides(data: dict, overrides: list[str]) -> set[tuple[str, ...]]:
    """Set each override in `data`; returns the key paths that came from the command line."""
    touched = set()
    for text in overrides:
        keys, value = parse_override(text)
        other = EXCLUSIVE_KEYS.get(tuple(keys))
        if other and isinstance(data.get(other[0]), dict) and other not in touched:
            data[other[0]].pop(other[1], None)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
        touched.add(tuple(keys))
    return touched


def _toml_line(text: str, loc: tuple) -> int | None:
    """Line number of `loc` (section, key, ...) in the TOML text, for error messages. Best effort."""
    names = [p for p in loc if isinstance(p, str)]
    if not names:
        return None
    section, key = names[0], names[-1]
    current = ""
    header = re.compile(r"^\s*\[+\s*([^\]]+?)\s*\]+")
    for number, line in enumerate(text.splitlines(), 1):
        match = header.match(line)
        if match:
            current = match.group(1).split(".")[0]
            if len(names) == 1 and current == section:
                return number
            continue
        if current == section and re.match(rf"^\s*{re.escape(key)}\s*=", line):
            return number
    return None


def _suggest(model: type[BaseModel], loc: tuple) -> str:
    """A "did you mean" for an unknown key, from the fields of the section it was found in."""
    node: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = node.model_fields.get(part) if isinstance(node, type) and issubclass(node, BaseModel) else None
        if field is None:
            return ""
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        node = inner[0] if inner and isinstance(inner[0], type) else annotation
    if not (isinstance(node, type) and issubclass(node, BaseModel)):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(node.model_fields), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(node.model_fields)}"


def _format_error(error: dict, model: type[BaseModel], text: str, source: str, overridden: set) -> str:
    loc = tuple(error["loc"])
    # pydantic adds the union member name to the location of some errors; drop it
    loc = tuple(p for p in loc if not (isinstance(p, str) and p in {"bool", "literal['auto']", "int", "float"}))
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    if tuple(str(p) for p in loc) in overridden:
        where = "command-line override"
    else:
        line = _toml_line(text, loc)
        where = f"{source}:{line}" if line else source
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key '{dotted}'{_suggest(model, loc)}"
    if error["type"] == "missing":
        return f"{where}: '{dotted}' is required"
    message = error["msg"].removeprefix("Value error, ")
    if loc and error["type"] != "value_error":
        return f"{where}: '{dotted}' = {error.get('input')!r}: {message}"
    return f"{where}: {message}"


def load_config(path: str | Path | None, overrides: list[str], model: type[RunConfig]) -> RunConfig:
    """Read, override and validate a config; raise ConfigError listing every problem."""
    source = str(path) if path else "(command line)"
    text = ""
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(source, [f"config file not found: {path}"])
        try:
            text = path.read_text(encoding="utf-8-sig")
            data = tomllib.loads(text)
        except UnicodeDecodeError:
            raise ConfigError(source, ["the file is not UTF-8 text; re-save it as UTF-8"]) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(source, [f"not valid TOML: {err}"]) from None
    else:
        data = {}
    try:
        overridden = apply_overrides(data, overrides)
    except ValueError as err:
        raise ConfigError(source, [str(err)]) from None
    overridden = {tuple(k) for k in overridden}
    # file-system and registry checks run on the raw data so they are reported beside schema errors
    problems = check_paths_and_names(data, base=Path(path).parent if path else Path.cwd())
    try:
        config = model.model_validate(data)
    except ValidationError as err:
        problems = [_format_error(e, model, text, source, overridden) for e in err.errors()] + problems
    if problems:
        raise ConfigError(source, problems)
    return config


def resolve_path(value: str, base: Path) -> Path:
    """Relative paths in a config are relative to the current directory, as users type them in a shell;
    fall back to the config's folder so shipped presets work from anywhere."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return p
    beside = base / p
    return beside if beside.exists() else p


def _check_path(table: dict, key: str, label: str, base: Path, kind: str) -> str | None:
    """Resolve table[key] in place; return a problem if it does not exist."""
    value = table.get(key)
    if not isinstance(value, str) or not value:
        return None
    resolved = resolve_path(value, base)
    exists = resolved.is_dir() if kind == "folder" else resolved.is_file()
    if not exists:
        return f"{label}: {kind} not found: {value}"
    table[key] = str(resolved)
    return None


def check_paths_and_names(data: dict, base: Path) -> list[str]:
    """Checks that need the file system or other modules' registries (still no model loading).
    Works on the raw TOML data so they run even when the schema has errors; resolves paths in place."""
    from library.models.loading import model_path_problem
    from library.training.optimizers import optimizer_name_problem
    from library.training.schedules import scheduler_name_problem

    def table(name: str) -> dict:
        value = data.get(name)
        return value if isinstance(value, dict) else {}

    checks = [
        (table("dataset"), "train_dir", "dataset.train_dir", "folder"),
        (table("dataset"), "reg_dir", "dataset.reg_dir", "folder"),
        (table("model"), "config_dir", "model.config_dir", "folder"),
        (table("save"), "resume", "save.resume", "folder"),
        (table("network"), "init_weights", "network.init_weights", "file"),
        (table("sample"), "prompt_file", "sample.prompt_file", "file"),
    ]
    subsets = table("dataset").get("subsets")
    for i, subset in enumerate(subsets if isinstance(subsets, list) else []):
        if isinstance(subset, dict):
            checks.append((subset, "image_dir", f"dataset.subsets[{i}].image_dir", "folder"))
    problems = [p for t, key, label, kind in checks if (p := _check_path(t, key, label, base, kind))]

    model_path = table("model").get("path")
    if isinstance(model_path, str) and model_path:
        if not model_path.startswith("builtin:"):
            resolved = resolve_path(model_path, base)
            if resolved.exists():
                model_path = table("model")["path"] = str(resolved)
        if problem := model_path_problem(model_path):
            problems.append(f"model.path: {problem}")
    for key, check in (("name", optimizer_name_problem), ("scheduler", scheduler_name_problem)):
        value = table("optimizer").get(key)
        if isinstance(value, str) and (problem := check(value)):
            problems.append(f"optimizer.{key}: {problem}")
    if table("optimizer").get("warmup_steps") and table("optimizer").get("warmup_ratio"):
        problems.append("optimizer.warmup_steps and optimizer.warmup_ratio are both set: keep one")
    dataset = table("dataset")
    has_train_subset = any(isinstance(s, dict) and not s.get("is_reg") for s in (subsets if isinstance(subsets, list) else []))
    if not dataset.get("train_dir") and not has_train_subset:
        problems.append("dataset: no training images configured: set dataset.train_dir or add [[dataset.subsets]]")
    return problems


def config_to_toml(config: RunConfig) -> str:
    """The fully resolved config as TOML (what --print-config shows and what runs record)."""
    data = config.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(data)
