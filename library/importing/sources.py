"""Reading the configs users bring: an sd-scripts `--config_file` TOML (sections flattened, as sd-scripts does)
with its `--dataset_config`, and a kohya_ss GUI JSON, translated to sd-scripts option names the way the GUI
passes them (numbers written as text, "" and 0 as unset, LoRA_type → network_module + network_args, the
warmup percentage, the epoch count, the prompt text...). Pure: reads the given files only."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Callable

Skip = Callable[[str, Any, str], None]  # (key, value, reason): a key that is not brought over

# GUI values where 0 (or "") means "not set" (the GUI leaves the flag out)
_ZERO_IS_UNSET = {"clip_skip", "seed", "max_train_steps", "max_train_epochs", "save_every_n_epochs",
                  "save_every_n_steps", "save_last_n_steps", "save_last_n_steps_state", "sample_every_n_steps",
                  "sample_every_n_epochs", "min_timestep", "max_timestep", "vae_batch_size", "min_snr_gamma",
                  "ip_noise_gamma", "noise_offset", "adaptive_noise_scale", "multires_noise_iterations",
                  "network_dropout", "scale_weight_norms", "v_pred_like_loss", "caption_dropout_every_n_epochs",
                  "lr_scheduler_power", "lr_scheduler_num_cycles", "stop_text_encoder_training",
                  "num_vectors_per_token", "keep_tokens", "caption_dropout_rate"}

# GUI settings that do not change what is trained (launcher, hub and tracker settings)
GUI_ONLY = {
    "model_list": "the GUI's model picker", "sdxl": "Kiln reads the model family from the model",
    "num_cpu_threads_per_process": "accelerate launcher setting", "num_processes": "accelerate launcher setting",
    "num_machines": "accelerate launcher setting", "multi_gpu": "accelerate launcher setting",
    "gpu_ids": "accelerate launcher setting", "main_process_port": "accelerate launcher setting",
    "dynamo_backend": "accelerate launcher setting", "extra_accelerate_launch_args": "accelerate launcher setting",
    "use_wandb": "Kiln logs to TensorBoard", "wandb_api_key": "Kiln logs to TensorBoard",
    "wandb_run_name": "Kiln logs to TensorBoard", "log_tracker_name": "Kiln logs to TensorBoard",
    "log_tracker_config": "Kiln logs to TensorBoard", "save_state_on_train_end": "Kiln saves a state on Ctrl-C",
    "save_as_bool": "GUI setting", "stop_text_encoder_training_pct": "GUI setting",
    "additional_parameters": "raw command-line flags: add the matching Kiln keys by hand",
    "LyCORIS_preset": "Kiln chooses the modules itself",
}

# GUI keys whose value is translated to sd-scripts options before the rules apply (README's GUI table)
GUI_TRANSLATED = {
    "LoRA_type": "network_module + network_args: Standard → networks.lora; Kohya LoCon → networks.lora with "
                 "conv_dim/conv_alpha; LoCon, LyCORIS/LoCon, LyCORIS/LoHa, LyCORIS/LoKr → lycoris.kohya algo=...; "
                 "other types are not imported",
    "conv_dim, conv_alpha": "network_args (LoCon types)",
    "max_resolution": "resolution",
    "optimizer": "optimizer_type",
    "optimizer_args": "\"k=v k=v\" text → optimizer_args",
    "lr_warmup": "a percentage of all steps → optimizer.warmup_ratio",
    "epoch": "max_train_epochs, unless max_train_steps or max_train_epochs is set",
    "lr_scheduler_num_cycles": "empty with cosine_with_restarts: `epoch`, as the GUI passes it",
    "xformers": "\"xformers\" / true → train.attention = \"xformers\"; \"sdpa\" → \"sdpa\"",
    "noise_offset_type": "Original: the noise_offset keys are read; Multires: the multires_noise keys",
    "unet_lr, text_encoder_lr": "one of them 0 → train only the other (network.train_unet / train_text_encoder)",
    "sample_prompts": "the prompt text itself → sample.prompts",
    "max_token_length": "75 means off",
    "template (TI)": "caption → [filewords]; object template → subject; style template → style",
    "numbers as text, \"\", 0": "read as numbers; \"\" is unset; 0 is unset where the GUI leaves the flag out",
}

_LORA_TYPES = {"Standard": ("networks.lora", None, False), "Kohya LoCon": ("networks.lora", None, True),
               "LoCon": ("lycoris.kohya", "locon", True), "LyCORIS/LoCon": ("lycoris.kohya", "locon", True),
               "LyCORIS/LoHa": ("lycoris.kohya", "loha", True), "LyCORIS/LoKr": ("lycoris.kohya", "lokr", True)}
_NETWORK_ARG_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                     "block_alphas", "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout")
_LYCORIS_KEYS = ("factor", "use_cp", "use_tucker", "use_scalar", "decompose_both", "rank_dropout_scale",
                 "train_norm", "train_on_input", "constrain", "rescaled", "unit", "bypass_mode", "dora_wd")
_TI_TEMPLATES = {"caption": None, "object template": "use_object_template", "style template": "use_style_template"}


def read_sdscripts_config(path: Path) -> dict[str, Any]:
    """sd-scripts' read_config_from_file: every top-level table is flattened one level (section names are
    free-form); later sections win on a repeated key."""
    data = tomllib.loads(Path(path).read_text(encoding="utf-8-sig"))
    options: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            options.update(value)
        else:
            options[key] = value
    return options


def read_dataset_config(path: Path) -> dict[str, Any]:
    """An sd-scripts dataset config ([general], [[datasets]], [[datasets.subsets]]), TOML or JSON."""
    text = Path(path).read_text(encoding="utf-8-sig")
    return json.loads(text) if Path(path).suffix.lower() == ".json" else tomllib.loads(text)


def _gui_value(key: str, value: Any) -> Any:
    """The GUI saves numbers as text in older versions, "" for unset, floats for ints: the value sd-scripts gets."""
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return None
        try:
            number = float(text)
        except ValueError:
            return value
        value = int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # older GUIs save ints as 64.0; the rules turn them back into floats where needed
    if key in _ZERO_IS_UNSET and value == 0 and not isinstance(value, bool):
        return None
    return value


def _gui_network(gui: dict, options: dict, skip: Skip) -> None:
    """LoRA_type + conv_dim/conv_alpha/block weights/LyCORIS keys → network_module + network_args, as the GUI
    builds them."""
    lora_type = gui.get("LoRA_type")
    if lora_type is None:
        return
    lycoris = lora_type in _LORA_TYPES and _LORA_TYPES[lora_type][1] is not None
    for key in _LYCORIS_KEYS if not lycoris else ():
        if gui.get(key) not in (None, "", 0, False, -1):
            skip(key, gui[key], f"the GUI passes it for LyCORIS types only, not {lora_type}")
    if lora_type == "Standard" and gui.get("conv_dim") not in (None, 0, 1):
        skip("conv_dim", gui["conv_dim"], "the GUI passes it for LoCon types only (Kohya LoCon, LyCORIS)")
    if lora_type not in _LORA_TYPES:
        skip("LoRA_type", lora_type, "no Kiln network kind for it (Kiln: Standard, Kohya LoCon, LyCORIS "
                                     "LoCon/LoHa/LoKr)")
        return
    module, algo, conv = _LORA_TYPES[lora_type]
    args = [f"algo={algo}"] if algo else []
    if conv and gui.get("conv_dim"):
        args += [f"conv_dim={gui['conv_dim']}", f"conv_alpha={gui.get('conv_alpha') or 1}"]
    for key in _NETWORK_ARG_KEYS + (_LYCORIS_KEYS if algo else ()):
        value = gui.get(key)
        if value not in (None, "", 0, False) and not (key == "factor" and value == -1):
            args.append(f"{key}={value}")
    options["network_module"] = module
    options["network_args"] = args


def _gui_length(gui: dict, options: dict) -> None:
    """The GUI's `epoch` is the epoch count unless max_train_steps or max_train_epochs is set (lr_warmup is a
    percentage of all steps; an empty lr_scheduler_num_cycles means `epoch`)."""
    if not options.get("max_train_steps") and not options.get("max_train_epochs") and gui.get("epoch"):
        options["max_train_epochs"] = gui["epoch"]
    if gui.get("lr_warmup"):
        options["lr_warmup_steps"] = f"{gui['lr_warmup']}%"
    if options.get("lr_scheduler_num_cycles") is None and gui.get("epoch") and \
            options.get("lr_scheduler") == "cosine_with_restarts":
        options["lr_scheduler_num_cycles"] = gui["epoch"]


def _gui_choices(gui: dict, options: dict, skip: Skip) -> None:
    """Keys whose GUI value selects what sd-scripts receives: attention, noise type, TE-only/UNet-only, TI
    template, token length."""
    attention = gui.get("xformers")
    options.pop("xformers", None)
    if attention in (True, "xformers"):
        options["xformers"] = True
    elif attention == "sdpa":
        options["sdpa"] = True
    keep = ("noise_offset", "adaptive_noise_scale", "noise_offset_random_strength")
    drop = ("multires_noise_iterations", "multires_noise_discount")
    if gui.get("noise_offset_type") == "Multires":
        keep, drop = drop, keep
    for key in drop:
        options.pop(key, None)  # the GUI does not pass the unselected noise type's values
    if "LoRA_type" in gui:
        unet_lr, te_lr = gui.get("unet_lr"), gui.get("text_encoder_lr")
        if unet_lr and te_lr == 0:
            options["network_train_unet_only"] = True
        if te_lr and unet_lr == 0:
            options["network_train_text_encoder_only"] = True
    if options.get("max_token_length") == 75:
        options.pop("max_token_length")  # 75 is the GUI's "off"
    template = options.pop("template", None)
    if template is not None:
        if template not in _TI_TEMPLATES:
            skip("template", template, "unknown GUI template choice (caption, object template, style template)")
        elif _TI_TEMPLATES[template]:
            options[_TI_TEMPLATES[template]] = True


def read_kohya_gui(path: Path, skip: Skip) -> dict[str, Any]:
    """A kohya_ss GUI JSON config as the sd-scripts options the GUI would pass; GUI-only settings that are set
    are reported through `skip` (unset ones are dropped as the GUI drops them)."""
    raw = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a kohya_ss GUI config (a JSON object of settings)")
    gui = {key: _gui_value(key, value) for key, value in raw.items()}
    translated = {"LoRA_type", "conv_dim", "conv_alpha", "max_resolution", "optimizer", "lr_warmup", "epoch",
                  "noise_offset_type", *_NETWORK_ARG_KEYS, *_LYCORIS_KEYS}
    options = {key: value for key, value in gui.items() if key not in GUI_ONLY and key not in translated}
    if "optimizer" in gui:
        options["optimizer_type"] = gui["optimizer"]
    if gui.get("max_resolution"):
        options["resolution"] = gui["max_resolution"]
    if "lora_network_weights" in options:
        options["network_weights"] = options.pop("lora_network_weights")
    _gui_network(gui, options, skip)
    _gui_length(gui, options)
    _gui_choices(gui, options, skip)
    lycoris = str(gui.get("LoRA_type", "")).startswith(("LyCORIS", "LoCon"))
    for key, reason in GUI_ONLY.items():
        value = gui.get(key)
        if key == "LyCORIS_preset" and not lycoris:
            continue  # the GUI keeps it even for plain LoRA, where it does nothing
        if value not in (None, False, ""):
            skip(key, "(hidden)" if "key" in key else value, reason)
    return options


def gui_table() -> str:
    """README's "kohya_ss GUI key → how it is read" table (keys not listed use the sd-scripts table)."""
    rows = ["| kohya_ss GUI key | read as |", "|---|---|"]
    rows += [f"| `{key}` | {how} |" for key, how in GUI_TRANSLATED.items()]
    rows += [f"| `{key}` | not imported: {why} |" for key, why in GUI_ONLY.items()]
    return "\n".join(rows) + "\n"
