"""The `ss_*` and `modelspec.*` strings A1111, ComfyUI and civitai show for a trained network (all strings)."""
from __future__ import annotations

import datetime
import hashlib
import json
import time
import uuid
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors_bytes

from library.data.folders import DatasetScan
from library.models.hashes import legacy_model_hash
from library.models.parts import ModelParts
from library.training.resolved import ResolvedRun


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


def bucket_info(run: ResolvedRun) -> dict[str, str]:
    """ss_bucket_info and the resolved bucket range, as sd-scripts records them when buckets are on."""
    ds, buckets = run.config.dataset, run.buckets
    if buckets is None:
        return {"ss_min_bucket_reso": "None", "ss_max_bucket_reso": "None"}
    rows = buckets.rows(run.data.items)
    info = {"buckets": {str(i): {"resolution": list(size), "count": samples} for i, (size, _, samples) in enumerate(rows)},
            "mean_img_ar_error": buckets.mean_aspect_error()}
    return {"ss_bucket_info": json.dumps(info), "ss_min_bucket_reso": str(buckets.settings.min_reso),
            "ss_max_bucket_reso": str(buckets.settings.max_reso), "ss_bucket_reso_steps": str(ds.bucket_reso_steps)}


def _none(value) -> str:
    """sd-scripts writes str() of an option that is None when unset; Kiln's 0 means unset for these."""
    return str(value) if value else "None"


def option_metadata(run: ResolvedRun) -> dict[str, str]:
    """The noise, loss, precision and augmentation options under the ss_* keys sd-scripts writes them."""
    train, ds = run.config.train, run.config.dataset
    values = {
        "ss_noise_offset_random_strength": str(train.noise_offset_random_strength),
        "ss_adaptive_noise_scale": _none(train.adaptive_noise_scale),
        "ss_multires_noise_iterations": _none(train.multires_noise_iterations),
        "ss_multires_noise_discount": str(train.multires_noise_discount),
        "ss_ip_noise_gamma": _none(train.ip_noise_gamma),
        "ss_ip_noise_gamma_random_strength": str(train.ip_noise_gamma_random_strength),
        "ss_zero_terminal_snr": str(train.zero_terminal_snr),
        "ss_debiased_estimation": str(train.debiased_estimation_loss),
        "ss_loss_type": train.loss_type,
        "ss_huber_schedule": train.huber_schedule,
        "ss_huber_c": str(train.huber_c),
        "ss_huber_scale": str(train.huber_scale),
        "ss_full_fp16": str(train.full_fp16),
        "ss_color_aug": str(ds.color_aug),
        "ss_random_crop": str(ds.random_crop),
        "ss_face_crop_aug_range": str(tuple(ds.face_crop_aug_range)) if ds.face_crop_aug_range else "None",
        "ss_datasets": json.dumps([dataset_entry(run)], ensure_ascii=False),
    }
    if train.min_timestep or train.max_timestep != 1000:  # sai-modelspec's key, as sd-scripts writes it
        values["modelspec.timestep_range"] = f"{train.min_timestep},{train.max_timestep}"
    return values


def dataset_entry(run: ResolvedRun) -> dict:
    """The run's dataset as one entry of sd-scripts' ss_datasets, with each folder's caption options."""
    config, scan, data = run.config, run.scan, run.data
    ds = config.dataset
    subsets = []
    for index, subset in enumerate(scan.subsets):
        captions = data.subsets[index].captions if index in data.subsets else data.caption_options
        subsets.append({
            "img_count": sum(1 for item in scan.items if item.subset_index == index),
            "num_repeats": subset.repeats, "color_aug": ds.color_aug, "flip_aug": ds.flip_aug,
            "random_crop": ds.random_crop, "shuffle_caption": captions.shuffle, "keep_tokens": captions.keep_tokens,
            "keep_tokens_separator": captions.keep_tokens_separator,
            "secondary_separator": captions.secondary_separator or None, "enable_wildcard": captions.wildcards,
            "caption_prefix": captions.prefix or None, "caption_suffix": captions.suffix or None,
            "image_dir": subset.image_dir.name, "class_tokens": subset.class_tokens or None, "is_reg": subset.is_reg})
    return {"is_dreambooth": True, "batch_size_per_device": config.train.batch_size,
            "num_train_images": run.plan.train_samples, "num_reg_images": run.plan.reg_samples,
            "resolution": [ds.resolution, ds.resolution], "enable_bucket": ds.enable_buckets,
            "min_bucket_reso": run.buckets.settings.min_reso if run.buckets else None,
            "max_bucket_reso": run.buckets.settings.max_reso if run.buckets else None,
            "tag_frequency": tag_frequency(scan), "subsets": subsets}


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """sshs_model_hash / sshs_legacy_hash as sd-scripts precomputes them (for sd-webui-additional-networks):
    the file as written with only its ss_* metadata; SHA-256 of everything after the header, and the old
    64 KiB-at-1 MiB hash."""
    data = save_safetensors_bytes({k: v.contiguous() for k, v in tensors.items()},
                                  {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    legacy = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return {"sshs_model_hash": hashlib.sha256(data[8 + header:]).hexdigest(), "sshs_legacy_hash": legacy}


def training_metadata(run: ResolvedRun, parts: ModelParts, lrs: dict[str, float], network: dict[str, str]
                      ) -> dict[str, str]:
    """A training run's metadata as sd-scripts writes it. `lrs`: the rates per trained group ("unet",
    "text_encoder"); `network`: the network kind's ss_network_* entries."""
    config, scan, plan = run.config, run.scan, run.plan
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
        "ss_lr_warmup_steps": str(run.warmup_steps),
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
        **bucket_info(run),
        "ss_bucket_no_upscale": str(ds.bucket_no_upscale),
        "ss_gradient_checkpointing": str(train.gradient_checkpointing),
        "ss_max_token_length": str(train.max_token_length) if train.max_token_length != 75 else "None",
        "ss_sd_model_hash": legacy_model_hash(config.model.path) or "",
        "ss_prior_loss_weight": str(ds.prior_loss_weight),
        "ss_tag_frequency": json.dumps(tag_frequency(scan), ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(dataset_dirs(scan), ensure_ascii=False),
        **option_metadata(run),
        **model_metadata(parts, config.save.name, ds.resolution),
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
    }
    if len(text_rates) > 1:
        values["kiln.text_encoder_lr"] = json.dumps(text_rates)
    return values
