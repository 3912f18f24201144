"""The `ss_*` and `modelspec.*` strings A1111, ComfyUI and civitai show for a trained network (all strings)."""
from __future__ import annotations

import datetime
import json
import time
import uuid
from collections import Counter
from pathlib import Path

from library.config.schema import RunConfig
from library.data.folders import DatasetScan
from library.models.parts import ModelParts
from library.training.plan import TrainingPlan


def tag_frequency(scan: DatasetScan) -> dict[str, dict[str, int]]:
    frequency: dict[str, Counter] = {}
    for item in scan.items:
        folder = item.path.parent.name
        tags = [t.strip() for t in item.caption.split(",") if t.strip()]
        frequency.setdefault(folder, Counter()).update(tags)
    return {folder: dict(counter) for folder, counter in frequency.items()}


def dataset_dirs(scan: DatasetScan) -> dict[str, dict[str, int]]:
    dirs = {}
    for subset in scan.subsets:
        count = sum(1 for item in scan.items if item.path.parent == subset.image_dir)
        dirs[subset.image_dir.name] = {"n_repeats": subset.repeats, "img_count": count}
    return dirs


def model_metadata(parts: ModelParts, title: str, resolution: int | None = None) -> dict[str, str]:
    """What identifies the base model: its family's version strings, prediction type and name."""
    _, architecture = parts.family.base_model_version(parts.v_prediction)
    values = {
        **parts.family.metadata(parts.v_prediction),
        "ss_sd_model_name": Path(parts.source).name,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": parts.family.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.prediction_type": "v" if parts.v_prediction else "epsilon",
    }
    if resolution:
        values["modelspec.resolution"] = f"{resolution}x{resolution}"
    return values


def training_metadata(config: RunConfig, parts: ModelParts, scan: DatasetScan, plan: TrainingPlan,
                      warmup_steps: int, lrs: dict[str, float], network: dict[str, str]) -> dict[str, str]:
    """A training run's metadata as sd-scripts writes it. `lrs`: the rates per trained group ("unet",
    "text_encoder"); `network`: the network kind's ss_network_* entries."""
    opt, train, ds = config.optimizer, config.train, config.dataset
    text_rates = {group: lr for group, lr in lrs.items() if group != "unet"}
    values = {
        "ss_session_id": str(uuid.uuid4().int % 2**31),
        "ss_training_started_at": str(int(time.time())),
        "ss_output_name": config.save.name,
        **network,
        "ss_learning_rate": str(opt.lr),
        "ss_unet_lr": str(lrs["unet"]) if "unet" in lrs else "0",
        # one number, as sd-scripts writes it (its SD/SDXL LoRA has one rate for every text encoder; viewers
        # read a float): the first encoder's; kiln.text_encoder_lr keeps each encoder's own
        "ss_text_encoder_lr": str(next(iter(text_rates.values()))) if text_rates else "0",
        "ss_optimizer": f"{opt.name}({json.dumps(opt.args)})" if opt.args else opt.name,
        "ss_lr_scheduler": opt.scheduler,
        "ss_lr_warmup_steps": str(warmup_steps),
        "ss_max_train_steps": str(plan.total_steps),
        "ss_num_epochs": str(plan.epochs),
        "ss_num_batches_per_epoch": str(plan.batches_per_epoch),
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_num_train_images": str(plan.train_samples),
        "ss_num_reg_images": str(plan.reg_samples),
        "ss_resolution": f"({ds.resolution}, {ds.resolution})",
        "ss_clip_skip": str(config.model.clip_skip),
        "ss_seed": str(train.seed),
        "ss_mixed_precision": train.mixed_precision,
        "ss_noise_offset": str(train.noise_offset),
        "ss_min_snr_gamma": str(train.min_snr_gamma),
        "ss_shuffle_caption": str(ds.shuffle_caption),
        "ss_keep_tokens": str(ds.keep_tokens),
        "ss_caption_dropout_rate": str(ds.caption_dropout_rate),
        "ss_caption_tag_dropout_rate": str(ds.caption_tag_dropout_rate),
        "ss_flip_aug": str(ds.flip_aug),
        "ss_enable_bucket": str(ds.enable_buckets),
        "ss_min_bucket_reso": str(ds.min_bucket_reso),
        "ss_max_bucket_reso": str(ds.max_bucket_reso),
        "ss_bucket_no_upscale": str(ds.bucket_no_upscale),
        "ss_prior_loss_weight": str(ds.prior_loss_weight),
        "ss_tag_frequency": json.dumps(tag_frequency(scan), ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(dataset_dirs(scan), ensure_ascii=False),
        **model_metadata(parts, config.save.name, ds.resolution),
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
    }
    if len(text_rates) > 1:
        values["kiln.text_encoder_lr"] = json.dumps(text_rates)
    return values
