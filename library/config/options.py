"""Pure rules between the training options sd-scripts users bring (noise, loss, masks, augmentation, half
precision, the fused backward pass): each returns one line per problem, naming the keys and the fix. The schema
(schema.py) calls them from its validators; nothing here reads files."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the schema imports this module; it must not import the schema back at run time
    from library.config.schema import DatasetSection, RunConfig, SubsetSection, TrainSection

MASK_FILE, MASK_ALPHA = "file", "alpha"


def train_option_problems(train: "TrainSection") -> list[str]:
    """[train] keys that need another key, contradict one, or do nothing."""
    needs = [("noise_offset_random_strength", train.noise_offset_random_strength, "noise_offset", train.noise_offset),
             ("adaptive_noise_scale", train.adaptive_noise_scale, "noise_offset", train.noise_offset),
             ("ip_noise_gamma_random_strength", train.ip_noise_gamma_random_strength, "ip_noise_gamma",
              train.ip_noise_gamma),
             ("multires_noise_discount", train.multires_noise_discount != 0.3, "multires_noise_iterations",
              train.multires_noise_iterations)]
    problems = [f"train.{key} needs train.{other} > 0 (alone it does nothing): set train.{other} or remove "
                f"train.{key}" for key, on, other, other_value in needs if on and not other_value]
    if train.min_timestep >= train.max_timestep:
        problems.append(f"train.min_timestep = {train.min_timestep} must be below train.max_timestep = "
                        f"{train.max_timestep} (timesteps are drawn from [min, max))")
    huber_keys = [key for key, default in (("huber_schedule", "snr"), ("huber_c", 0.1), ("huber_scale", 1.0))
                  if getattr(train, key) != default]
    if huber_keys and train.loss_type not in ("huber", "smooth_l1"):
        verb = "applies" if len(huber_keys) == 1 else "apply"
        problems.append(f"{', '.join('train.' + k for k in huber_keys)} {verb} to train.loss_type = \"huber\" or "
                        f"\"smooth_l1\" only (this is \"{train.loss_type}\")")
    elif train.huber_scale != 1.0 and train.huber_schedule == "snr":
        problems.append("train.huber_scale has no effect with train.huber_schedule = \"snr\" (as in sd-scripts): "
                        "use \"constant\" or \"exponential\", or remove train.huber_scale")
    if train.v_pred_like_loss and train.scale_v_pred_loss_like_noise_pred:
        problems.append("train.v_pred_like_loss is for ε-prediction models and "
                        "train.scale_v_pred_loss_like_noise_pred for v-prediction models: keep one")
    for key, precision in (("full_bf16", "bf16"), ("full_fp16", "fp16")):
        if getattr(train, key) and train.mixed_precision != precision:
            problems.append(f"train.{key} = true needs train.mixed_precision = \"{precision}\" (this is "
                            f"\"{train.mixed_precision}\")")
    return problems


def subset_mask_mode(ds: "DatasetSection", subset: "SubsetSection | None", is_reg: bool) -> str | None:
    """Where a folder's loss masks come from: MASK_ALPHA (the images' alpha), MASK_FILE (mask images) or None.
    A subset that sets masked_loss or alpha_mask decides alone; otherwise training folders follow the dataset's
    keys and regularisation folders have none."""
    if subset is not None and (subset.alpha_mask is not None or subset.masked_loss is not None):
        alpha, files = bool(subset.alpha_mask), bool(subset.masked_loss)
    elif is_reg:
        return None
    else:
        alpha, files = ds.alpha_mask, ds.masked_loss
    return MASK_ALPHA if alpha else MASK_FILE if files else None


def _mask_problems(ds: "DatasetSection") -> list[str]:
    problems = []
    if ds.masked_loss and ds.alpha_mask:
        problems.append("dataset.masked_loss (mask images) and dataset.alpha_mask (the images' alpha) are both "
                        "on: keep one")
    if ds.mask_dir and not ds.masked_loss:
        problems.append("dataset.mask_dir holds mask images, used with dataset.masked_loss = true: set it")
    modes = [subset_mask_mode(ds, None, False)]
    for index, subset in enumerate(ds.subsets):
        label = f"dataset.subsets[{index}]"
        if subset.masked_loss and subset.alpha_mask:
            problems.append(f"{label}: masked_loss and alpha_mask are both on: keep one")
            continue
        mode = subset_mask_mode(ds, subset, subset.is_reg)
        modes.append(mode)
        if subset.mask_dir and mode != MASK_FILE:
            problems.append(f"{label}.mask_dir holds mask images, used when the folder has masked_loss = true: "
                            f"set {label}.masked_loss = true")
    if any(modes) and ds.random_crop:
        problems.append("loss masks need the same crop as their image: dataset.random_crop = true cannot be used "
                        "with dataset.masked_loss / alpha_mask")
    if any(modes) and ds.face_crop_aug_range:
        problems.append("loss masks need the same crop as their image: dataset.face_crop_aug_range cannot be "
                        "used with dataset.masked_loss / alpha_mask")
    return problems


def dataset_option_problems(ds: "DatasetSection") -> list[str]:
    """[dataset] augmentation and mask keys: what cached latents cannot hold, and masks' rules."""
    problems = []
    fresh = "changes the pixels every step, so cached latents would be stale: set dataset.cache_latents = 'off'"
    if ds.color_aug and ds.cache_latents != "off":
        problems.append(f"dataset.color_aug {fresh} or dataset.color_aug = false")
    if ds.face_crop_aug_range is not None:
        low, high = ds.face_crop_aug_range
        if not 0 < low <= high:
            problems.append(f"dataset.face_crop_aug_range = {ds.face_crop_aug_range}: give [low, high] with "
                            "0 < low <= high (the face's share of the image side, e.g. [2.0, 4.0])")
        if ds.cache_latents != "off":
            problems.append(f"dataset.face_crop_aug_range {fresh} or remove it")
        if ds.enable_buckets:
            problems.append("dataset.face_crop_aug_range applies without buckets only (as in sd-scripts): set "
                            "dataset.enable_buckets = false or remove it")
    if ds.secondary_separator and ds.secondary_separator.strip() in ("", ","):
        problems.append(f"dataset.secondary_separator = {ds.secondary_separator!r} must differ from the tag "
                        "separator ',' (e.g. \";;;\")")
    return problems + _mask_problems(ds)


def run_option_problems(config: "RunConfig") -> list[str]:
    """Rules between sections: prediction type vs the loss options, and the fused backward pass."""
    train, opt, problems = config.train, config.optimizer, []
    v_param = config.model.v_parameterization
    if train.v_pred_like_loss and v_param is True:
        problems.append("train.v_pred_like_loss is for ε-prediction models, but model.v_parameterization = true "
                        "(sd-scripts refuses it too): remove it")
    if train.scale_v_pred_loss_like_noise_pred and v_param is False:
        problems.append("train.scale_v_pred_loss_like_noise_pred is for v-prediction models, but "
                        "model.v_parameterization = false: remove it")
    if opt.fused_backward_pass:
        if opt.name.strip().lower() != "adafactor":
            problems.append(f"optimizer.fused_backward_pass works with optimizer.name = \"Adafactor\" only (this is "
                            f"{opt.name!r}), as in sd-scripts")
        if train.gradient_accumulation_steps != 1:
            problems.append("optimizer.fused_backward_pass steps each tensor during the backward pass, so it cannot "
                            "accumulate gradients: set train.gradient_accumulation_steps = 1")
        if train.mixed_precision == "fp16":
            problems.append("optimizer.fused_backward_pass cannot unscale fp16 gradients tensor by tensor: use "
                            "train.mixed_precision = \"bf16\" (with train.full_bf16) or \"no\"")
    return problems
