"""The importer's mapping table, as data: each sd-scripts option (training `--config_file` keys and
`--dataset_config` keys, which kohya_ss GUI configs are first translated to) → the Kiln key it sets and how, or
why it is not imported. README's "sd-scripts option → Kiln key" table is generated from RULES (a test keeps
them in sync), so the table and the importer cannot drift apart."""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any

from library.importing.converters import (Converter, NotImported, Values, fresh_pixels, huber, needs, pair,
                                          to_key, whole)

@dataclass(frozen=True)
class Rule:
    option: str  # the sd-scripts option (config_file key, or dataset_config key)
    kiln: str  # the Kiln key(s) it sets, as the README shows them; "" when it is not imported
    note: str = ""  # how the value converts, or (kiln == "") why it is not imported
    convert: Converter | None = None  # None: the value as it is, to `kiln`
    trainers: tuple[str, ...] = ()  # the trainers it applies to (empty: all)
    keep_false: bool = False  # false / 0 still means something (e.g. cache_latents = false → no cache)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value  # newer sd-scripts: one lr per text encoder


def _resolution(value: Any, options: dict, skip) -> Values:
    """"512,512" / "512" / 512 / [512, 768] → dataset.resolution; Kiln's is square, so W≠H keeps the area."""
    parts = [int(float(p)) for p in str(value).replace("[", "").replace("]", "").split(",") if str(p).strip()]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise NotImported(f"{value!r} is not a resolution (\"W,H\" or one number)")
    width, height = parts
    if width == height:
        return {"dataset.resolution": width}
    side = int(round(math.sqrt(width * height) / 8) * 8)
    skip("resolution", value, f"Kiln trains square buckets around one size: dataset.resolution = {side} keeps "
                              f"the area of {width}x{height} (turn buckets on for other aspect ratios)")
    return {"dataset.resolution": side}


def parse_arg_list(value: Any) -> dict[str, str]:
    """sd-scripts' `["k=v", ...]` (or the GUI's "k=v k=v" string) → {k: "v"}; values stay text."""
    items = value.replace('"', " ").split() if isinstance(value, str) else list(value or [])
    parsed = {}
    for item in items:
        if "=" not in str(item):
            raise NotImported(f"{item!r} is not key=value")
        key, raw = str(item).split("=", 1)
        parsed[key.strip()] = raw.strip()
    return parsed


def literal(raw: str) -> Any:
    """sd-scripts reads optimizer args with ast.literal_eval: "0.9,0.99" → (0.9, 0.99) → a TOML list."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        lowered = raw.lower()
        value = {"true": True, "false": False}.get(lowered, raw)  # the GUI writes true/false in lower case
    return list(value) if isinstance(value, tuple) else value


def _optimizer_args(value: Any, options: dict, skip) -> Values:
    return {"optimizer.args": {key: literal(raw) for key, raw in parse_arg_list(value).items()}}


def _warmup(value: Any, options: dict, skip) -> Values:
    """An int is steps; a float below 1 (newer sd-scripts) or "5%" is a share of all steps."""
    if isinstance(value, str) and value.strip().endswith("%"):
        return {"optimizer.warmup_ratio": float(value.strip()[:-1]) / 100}
    if isinstance(value, float) and 0 < value < 1:
        return {"optimizer.warmup_ratio": value}
    return {"optimizer.warmup_steps": whole(value)}


_LYCORIS_TYPES = {"locon": "lora", "loha": "loha", "lokr": "lokr"}
_NETWORK_ARGS = {"conv_dim": ("network.conv_rank", whole), "conv_alpha": ("network.conv_alpha", float),
                 "factor": ("network.factor", int), "rank_dropout": ("network.rank_dropout", float),
                 "module_dropout": ("network.module_dropout", float),
                 "block_lr_zero_threshold": ("network.block_lr_zero_threshold", float)}
# block-wise arguments: sd-scripts' strings ("1,0.5,...", "sine+0.5") are Kiln's values as they are
_BLOCK_ARGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_dims", "block_alphas", "conv_block_dims",
               "conv_block_alphas")
_LORA_ONLY_ARGS = ("rank_dropout", "module_dropout")


def _network(value: Any, options: dict, skip) -> Values:
    """network_module (+ network_args' algo) → network.type; conv_dim/conv_alpha (and LoKr's factor) → keys."""
    args = parse_arg_list(options.get("network_args"))
    if value == "networks.lora":
        kind = "lora"
    elif value == "lycoris.kohya":
        algo = args.get("algo", "lora").lower()
        if algo not in _LYCORIS_TYPES and algo != "lora":
            raise NotImported(f"LyCORIS algo={algo} has no Kiln network kind (Kiln: LoRA/LoCon, LoHa, LoKr)")
        kind = _LYCORIS_TYPES.get(algo, "lora")
    else:
        raise NotImported("Kiln trains networks.lora (LoRA/LoCon) and LyCORIS LoHa/LoKr; this module has no "
                          "Kiln equivalent")
    values: Values = {"network.type": kind}
    for key, raw in args.items():
        if key == "algo":
            continue
        if key in _LORA_ONLY_ARGS and kind != "lora":
            skip(f"network_args {key}", raw, f"LoRA's in Kiln; its {kind} has no {key}")
        elif key in _NETWORK_ARGS and (key != "factor" or kind == "lokr"):
            target, cast = _NETWORK_ARGS[key]
            try:
                values[target] = cast(float(raw)) if cast is not float else float(raw)
            except (ValueError, NotImported):
                skip(f"network_args {key}", raw, "not a number")
        elif key in _BLOCK_ARGS:
            values[f"network.{key}"] = raw
        else:
            skip(f"network_args {key}", raw, _NETWORK_ARG_REASONS.get(key, "no Kiln setting for this network "
                                                                           "argument"))
    return values


_NETWORK_ARG_REASONS = {
    "preset": "Kiln chooses the modules itself (attention, MLP and, with conv_rank, ResNet convolutions)",
}


def _attention(name: str) -> Converter:
    return lambda value, options, skip: {"train.attention": name}


def _cache_latents(value: Any, options: dict, skip) -> Values:
    if options.get("cache_latents_to_disk"):
        return {"dataset.cache_latents": "disk"}
    return {"dataset.cache_latents": "memory" if value else "off"}


def _precision(value: Any, options: dict, skip) -> Values:
    names = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
    if str(value) not in names:
        raise NotImported(f"{value!r} is not float, fp16 or bf16")
    return {"save.precision": names[str(value)]}


def _mixed(value: Any, options: dict, skip) -> Values:
    return {"train.mixed_precision": str(value) if str(value) in ("no", "fp16", "bf16") else "no"}


def _sample_prompts(value: Any, options: dict, skip) -> Values:
    """A prompt file path (sd-scripts) → sample.prompt_file; prompt text (the kohya_ss GUI) → sample.prompts."""
    text = str(value)
    if "\n" in text or " --" in text or not text.lower().endswith((".txt", ".toml", ".json")):
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
        return {"sample.prompts": lines}
    if not text.lower().endswith(".txt"):
        raise NotImported("Kiln reads kohya prompt lines from a .txt file; convert the .toml/.json prompts")
    return {"sample.prompt_file": text}


def detect_trainer(options: dict) -> str:
    """train_network.py options → lora; train_textual_inversion.py's token_string → textual_inversion;
    anything else (train_db.py) → dreambooth."""
    if any(key in options for key in ("network_module", "network_dim", "LoRA_type")):
        return "lora"
    if "token_string" in options:
        return "textual_inversion"
    return "dreambooth"


def _save_format(value: Any, options: dict, skip) -> Values:
    """DreamBooth: diffusers folder or a single file; embeddings: .pt or .safetensors; LoRA: .safetensors."""
    trainer, value = detect_trainer(options), str(value)
    if trainer == "dreambooth":
        return {"dreambooth.save_format": "diffusers" if value.startswith("diffusers") else "single_file"}
    if trainer == "textual_inversion" and value in ("pt", "safetensors"):
        return {"embedding.format": value}
    if value != "safetensors":
        raise NotImported("Kiln writes LoRA files as .safetensors (A1111, ComfyUI and diffusers load them)")
    return {}


def _db_text_encoder(value: Any, options: dict, skip) -> Values:
    step = whole(value)
    if step < 0:
        return {"dreambooth.train_text_encoder": False}
    return {"dreambooth.train_text_encoder": True, "dreambooth.stop_text_encoder_training": step}


def _not(reason: str) -> tuple[str, str]:
    return "", reason


def _refuse(reason: str) -> Converter:
    """A listed option whose value cannot be brought over (the table says what to do instead)."""
    def convert(value: Any, options: dict, skip) -> Values:
        raise NotImported(reason)
    return convert


def _loss_type(value: Any, options: dict, skip) -> Values:
    if value not in ("l2", "l1", "huber", "smooth_l1"):
        raise NotImported(f"loss_type {value!r} is not one of l2, l1, huber, smooth_l1")
    return {"train.loss_type": value}


_UNSUPPORTED = "not implemented in Kiln"
LORA, TI, DB = ("lora",), ("textual_inversion",), ("dreambooth",)

RULES: tuple[Rule, ...] = (
    # model
    Rule("pretrained_model_name_or_path", "model.path"),
    Rule("v2", "", "not needed: Kiln reads SD 1.x / 2.x from the model itself"),
    Rule("v_parameterization", "model.v_parameterization", "true → true; false → left to \"auto\" (Kiln reads "
         "the prediction type from the model)"),
    Rule("clip_skip", "model.clip_skip", convert=to_key("model.clip_skip", whole)),
    Rule("vae", "", "a separate VAE file is not supported: Kiln uses the model's own VAE"),
    # network (LoRA)
    Rule("network_module", "network.type, network.conv_rank, network.conv_alpha, network.factor",
         "networks.lora → lora (conv_dim/conv_alpha in network_args → LoCon); lycoris.kohya algo=locon → lora, "
         "loha → loha, lokr → lokr", _network, LORA),
    Rule("network_args", "(see network_module)", "read together with network_module", lambda v, o, s: {}, LORA),
    Rule("network_dim", "network.rank", convert=to_key("network.rank", whole), trainers=LORA),
    Rule("network_alpha", "network.alpha", convert=to_key("network.alpha", float), trainers=LORA),
    Rule("network_dropout", "network.dropout", trainers=LORA),
    Rule("network_weights", "network.init_weights", trainers=LORA),
    Rule("network_train_unet_only", "network.train_text_encoder", "true → network.train_text_encoder = false",
         lambda v, o, s: {"network.train_text_encoder": False}, LORA),
    Rule("network_train_text_encoder_only", "network.train_unet", "true → network.train_unet = false",
         lambda v, o, s: {"network.train_unet": False}, LORA),
    Rule("unet_lr", "network.unet_lr", convert=to_key("network.unet_lr", float), trainers=LORA),
    Rule("text_encoder_lr", "network.text_encoder_lr", "a list (one per text encoder): the first",
         to_key("network.text_encoder_lr", lambda v: float(_first(v))), LORA),
    Rule("scale_weight_norms", "network.scale_weight_norms", convert=to_key("network.scale_weight_norms", float),
         trainers=LORA),
    Rule("dim_from_weights", *_not("set network.rank to the file's rank with network.init_weights")),
    # textual inversion (train_textual_inversion.py)
    Rule("token_string", "embedding.name", trainers=TI),
    Rule("init_word", "embedding.init_text", trainers=TI),
    Rule("num_vectors_per_token", "embedding.vectors", convert=to_key("embedding.vectors", whole), trainers=TI),
    Rule("use_object_template", "embedding.template", 'true → "subject"',
         to_key("embedding.template", lambda v: "subject"), TI),
    Rule("use_style_template", "embedding.template", 'true → "style"', to_key("embedding.template", lambda v: "style"),
         TI),
    Rule("weights", "embedding.resume", trainers=TI),
    # DreamBooth (train_db.py)
    Rule("stop_text_encoder_training", "dreambooth.train_text_encoder, dreambooth.stop_text_encoder_training",
         "a step: the text encoder trains until then; negative: not at all", _db_text_encoder, DB),
    Rule("learning_rate_te", "dreambooth.text_encoder_lr", convert=to_key("dreambooth.text_encoder_lr", float),
         trainers=DB),
    Rule("save_model_as", "dreambooth.save_format / embedding.format", "DreamBooth: diffusers → \"diffusers\", "
         "ckpt/safetensors → \"single_file\"; embeddings: pt/safetensors; LoRA: safetensors only", _save_format),
    Rule("no_token_padding", *_not(_UNSUPPORTED)),
    # optimizer and schedule
    Rule("optimizer_type", "optimizer.name"),
    Rule("use_8bit_adam", "optimizer.name", 'true → "AdamW8bit"', to_key("optimizer.name", lambda v: "AdamW8bit")),
    Rule("use_lion_optimizer", "optimizer.name", 'true → "Lion"', to_key("optimizer.name", lambda v: "Lion")),
    Rule("optimizer_args", "optimizer.args", '"k=v" strings → a table; values read as Python literals, as '
         'sd-scripts does ("0.9,0.99" → [0.9, 0.99])', _optimizer_args),
    Rule("learning_rate", "optimizer.lr", convert=to_key("optimizer.lr", float)),
    Rule("max_grad_norm", "optimizer.max_grad_norm", convert=to_key("optimizer.max_grad_norm", float),
         keep_false=True),
    Rule("lr_scheduler", "optimizer.scheduler"),
    Rule("lr_scheduler_num_cycles", "optimizer.num_cycles", convert=to_key("optimizer.num_cycles", whole)),
    Rule("lr_scheduler_power", "optimizer.power", convert=to_key("optimizer.power", float)),
    Rule("lr_warmup_steps", "optimizer.warmup_steps / optimizer.warmup_ratio",
         "an int is steps; a float < 1 or \"N%\" is a share of all steps", _warmup),
    Rule("lr_scheduler_type", *_not("custom scheduler classes are " + _UNSUPPORTED)),
    Rule("lr_scheduler_args", *_not("custom scheduler arguments are " + _UNSUPPORTED)),
    # length and batching
    Rule("train_batch_size", "train.batch_size", convert=to_key("train.batch_size", whole)),
    Rule("gradient_accumulation_steps", "train.gradient_accumulation_steps",
         convert=to_key("train.gradient_accumulation_steps", whole)),
    Rule("max_train_epochs", "train.epochs", "wins over max_train_steps, as in sd-scripts",
         to_key("train.epochs", whole)),
    Rule("max_train_steps", "train.max_steps", "used when max_train_epochs is not set (sd-scripts' default: "
         "1600)", to_key("train.max_steps", whole)),
    # training
    Rule("mixed_precision", "train.mixed_precision", convert=_mixed),
    Rule("full_fp16", "train.full_fp16"),
    Rule("full_bf16", "train.full_bf16"),
    Rule("fused_backward_pass", "optimizer.fused_backward_pass", "Adafactor only, as in sd-scripts"),
    Rule("gradient_checkpointing", "train.gradient_checkpointing"),
    Rule("seed", "train.seed", convert=to_key("train.seed", whole)),
    Rule("noise_offset", "train.noise_offset", convert=to_key("train.noise_offset", float)),
    Rule("min_snr_gamma", "train.min_snr_gamma", convert=to_key("train.min_snr_gamma", float)),
    Rule("xformers", "train.attention", 'true → "xformers"', _attention("xformers")),
    Rule("sdpa", "train.attention", 'true → "sdpa"', _attention("sdpa")),
    Rule("mem_eff_attn", "train.attention", 'true → "sdpa" (PyTorch\'s memory-efficient attention)',
         _attention("sdpa")),
    *(Rule(name, f"train.{name}", convert=to_key(f"train.{name}", cast)) for name, cast in (
        ("multires_noise_iterations", whole), ("ip_noise_gamma", float), ("zero_terminal_snr", bool),
        ("debiased_estimation_loss", bool), ("scale_v_pred_loss_like_noise_pred", bool), ("v_pred_like_loss", float),
        ("min_timestep", whole), ("max_timestep", whole))),
    Rule("multires_noise_discount", "train.multires_noise_discount", "with multires_noise_iterations",
         needs("multires_noise_iterations", "train.multires_noise_discount", float)),
    Rule("adaptive_noise_scale", "train.adaptive_noise_scale", "with noise_offset",
         needs("noise_offset", "train.adaptive_noise_scale", float)),
    Rule("noise_offset_random_strength", "train.noise_offset_random_strength", "with noise_offset",
         needs("noise_offset", "train.noise_offset_random_strength")),
    Rule("ip_noise_gamma_random_strength", "train.ip_noise_gamma_random_strength", "with ip_noise_gamma",
         needs("ip_noise_gamma", "train.ip_noise_gamma_random_strength")),
    Rule("loss_type", "train.loss_type", "l2, l1, huber, smooth_l1", _loss_type),
    *(Rule(name, f"train.{name}", "with loss_type huber / smooth_l1", huber(name))
      for name in ("huber_schedule", "huber_c", "huber_scale")),
    Rule("masked_loss", "dataset.masked_loss", "masks from conditioning_data_dir (per subset) or <stem>.mask.png"),
    Rule("alpha_mask", "dataset.alpha_mask"),
    Rule("color_aug", "dataset.color_aug", "also sets dataset.cache_latents = \"off\" (new pixels every step)",
         fresh_pixels("color_aug")),
    Rule("face_crop_aug_range", "dataset.face_crop_aug_range", "\"low,high\" → [low, high]; also sets "
         "dataset.cache_latents = \"off\"", fresh_pixels("face_crop_aug_range", pair)),
    Rule("keep_tokens_separator", "dataset.keep_tokens_separator"),
    Rule("secondary_separator", "dataset.secondary_separator"),
    Rule("enable_wildcard", "dataset.enable_wildcard"),
    *(Rule(name, *_not(_UNSUPPORTED)) for name in (
        "weighted_captions", "max_token_length", "caption_dropout_every_n_epochs", "token_warmup_min",
        "token_warmup_step", "caption_separator", "fp8_base")),
    Rule("conditioning_data_dir", "dataset.subsets[].mask_dir", "a subset's masks (with masked_loss = true); "
         "read in dataset configs", _refuse("a subset key: give it in the dataset config's subset")),
    # saving and logging
    Rule("output_dir", "save.output_dir"),
    Rule("output_name", "save.name"),
    Rule("save_precision", "save.precision", "float → fp32", _precision),
    Rule("save_every_n_epochs", "save.every_n_epochs", convert=to_key("save.every_n_epochs", whole)),
    Rule("save_every_n_steps", "save.every_n_steps", convert=to_key("save.every_n_steps", whole)),
    Rule("save_last_n_epochs", "save.keep_last", convert=to_key("save.keep_last", whole)),
    Rule("save_last_n_steps", "", "a step count in sd-scripts; Kiln's save.keep_last counts files",
         _refuse("it counts steps; set save.keep_last (a number of files) yourself")),
    Rule("save_state", "save.save_state"),
    Rule("resume", "", "an sd-scripts (accelerate) state cannot continue in Kiln",
         _refuse("an sd-scripts (accelerate) state folder cannot continue in Kiln: start anew")),
    Rule("logging_dir", "logging.log_dir"),
    Rule("log_with", "", "Kiln logs to TensorBoard"),
    Rule("log_prefix", "", "TensorBoard runs are named <save.name>-<time>"),
    Rule("training_comment", *_not("not written to the metadata by Kiln")),
    # previews
    Rule("sample_prompts", "sample.prompt_file / sample.prompts", "a .txt path → prompt_file; prompt text (the "
         "GUI's) → prompts", _sample_prompts),
    Rule("sample_every_n_steps", "sample.every_n_steps", convert=to_key("sample.every_n_steps", whole)),
    Rule("sample_every_n_epochs", "sample.every_n_epochs", convert=to_key("sample.every_n_epochs", whole)),
    Rule("sample_sampler", "sample.sampler"),
    Rule("sample_at_first", "sample.before_training"),
    # dataset
    Rule("train_data_dir", "dataset.train_dir", "NN_name folders, as in sd-scripts"),
    Rule("reg_data_dir", "dataset.reg_dir"),
    Rule("prior_loss_weight", "dataset.prior_loss_weight", convert=to_key("dataset.prior_loss_weight", float)),
    Rule("resolution", "dataset.resolution", '"W,H" → one size (W≠H: the same area)', _resolution),
    Rule("enable_bucket", "dataset.enable_buckets"),
    Rule("min_bucket_reso", "dataset.min_bucket_reso", convert=to_key("dataset.min_bucket_reso", whole)),
    Rule("max_bucket_reso", "dataset.max_bucket_reso", convert=to_key("dataset.max_bucket_reso", whole)),
    Rule("bucket_reso_steps", "dataset.bucket_reso_steps", convert=to_key("dataset.bucket_reso_steps", whole)),
    Rule("bucket_no_upscale", "dataset.bucket_no_upscale"),
    Rule("caption_extension", "dataset.caption_extension", "sd-scripts' default is \".caption\"", keep_false=True),
    Rule("shuffle_caption", "dataset.shuffle_caption"),
    Rule("keep_tokens", "dataset.keep_tokens", convert=to_key("dataset.keep_tokens", whole)),
    Rule("caption_prefix", "dataset.caption_prefix"),
    Rule("caption_suffix", "dataset.caption_suffix"),
    Rule("caption_dropout_rate", "dataset.caption_dropout_rate",
         convert=to_key("dataset.caption_dropout_rate", float)),
    Rule("caption_tag_dropout_rate", "dataset.caption_tag_dropout_rate",
         convert=to_key("dataset.caption_tag_dropout_rate", float)),
    Rule("flip_aug", "dataset.flip_aug"),
    Rule("random_crop", "dataset.random_crop", "also sets dataset.cache_latents = \"off\" (a new crop every step)",
         lambda v, o, s: {"dataset.random_crop": True, "dataset.cache_latents": "off"}),
    Rule("cache_latents", "dataset.cache_latents", "true → \"memory\"; false → \"off\"", _cache_latents,
         keep_false=True),
    Rule("cache_latents_to_disk", "dataset.cache_latents", "true → \"disk\"",
         lambda v, o, s: {"dataset.cache_latents": "disk"}),
    Rule("vae_batch_size", "dataset.vae_batch_size", convert=to_key("dataset.vae_batch_size", whole)),
    Rule("cache_text_encoder_outputs", "dataset.cache_text_encoder_outputs"),
    Rule("dataset_config", "(its datasets and subsets)", "read: [general] and [[datasets]] values, each "
         "[[datasets.subsets]] → [[dataset.subsets]] (image_dir, num_repeats → repeats, class_tokens, is_reg, "
         "caption_extension)", lambda v, o, s: {}),
    Rule("in_json", *_not("fine-tuning metadata datasets are not supported: use image folders with captions")),
    Rule("dataset_repeats", *_not("for metadata datasets only")),
    Rule("max_data_loader_n_workers", "", "no effect on results: Kiln caches and batches in-process"),
    Rule("persistent_data_loader_workers", "", "no effect on results: Kiln caches and batches in-process"),
    Rule("lowram", "", "no effect on results"),
    Rule("no_metadata", *_not("Kiln always writes the ss_* metadata")),
)

RULES_BY_OPTION = {rule.option: rule for rule in RULES}
