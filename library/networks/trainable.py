"""LoRA as a `Trainable` for the shared loop, and the `ss_*` / `modelspec.*` metadata tools show users."""
from __future__ import annotations

import datetime
import json
import time
import uuid
from collections import Counter
from pathlib import Path

import torch

from library.networks import lora
from library.training.checkpoints import Progress, atomic_save_safetensors
from library.config.schema import LoraRunConfig
from library.data.folders import DatasetScan
from library.models.loading import ModelParts
from library.training.plan import TrainingPlan
from library.training.schedules import resolve_warmup_steps

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class LoraTrainable:
    """LoRA on the UNet and/or the text encoder, injected with peft, saved in the kohya layout."""

    artifact_suffix = ".safetensors"

    def __init__(self, parts: ModelParts, config: LoraRunConfig, metadata: dict[str, str]):
        net = config.network
        self.parts = parts
        self.config = config
        self.metadata = metadata
        self.trains_text_encoder = net.train_text_encoder
        spec = lora.LoraSpec(net.rank, net.alpha, net.conv_rank, net.conv_alpha, net.dropout)
        parts.unet.requires_grad_(False)
        parts.text_encoder.requires_grad_(False)
        self.models: dict[str, tuple[torch.nn.Module, list[lora.Target], float]] = {}
        # peft draws the lora_down init from the global RNG: seed it so the same config gives the same run
        torch.manual_seed(config.train.seed)
        if net.train_unet:
            targets = lora.unet_targets(parts.unet, with_conv=net.conv_rank > 0)
            lora.add_lora(parts.unet, targets, spec)
            self.models["unet"] = (parts.unet, targets, net.unet_lr or config.optimizer.lr)
        if net.train_text_encoder:
            targets = lora.text_encoder_targets(parts.text_encoder)
            lora.add_lora(parts.text_encoder, targets, spec)
            self.models["text_encoder"] = (parts.text_encoder, targets, net.text_encoder_lr or config.optimizer.lr)
        if net.init_weights:
            weights, _ = lora.read_lora_file(net.init_weights)
            count = sum(lora.load_kohya_into(m, t, weights) for m, t, _ in self.models.values())
            if count == 0:
                raise ValueError(f"network.init_weights: no module of {net.init_weights} matches this network "
                                 "(another model family, or conv layers with network.conv_rank = 0?)")
            file_alphas = {float(v) for k, v in weights.items() if k.endswith(".alpha")}
            if file_alphas - {float(net.alpha), float(net.conv_alpha)}:
                raise ValueError(f"network.init_weights: the file's alpha {sorted(file_alphas)} differs from "
                                 f"network.alpha {net.alpha:g} / conv_alpha {net.conv_alpha:g}; set them to match")
            print(f"network: started from {net.init_weights} ({count} modules loaded)")

    def describe(self) -> str:
        counts = ", ".join(f"{name}: {len(t)} modules" for name, (_, t, _) in self.models.items())
        params = sum(p.numel() for g in self.param_groups() for p in g["params"])
        net = self.config.network
        conv = f", conv rank {net.conv_rank} alpha {net.conv_alpha:g}" if net.conv_rank else ""
        return f"network: LoRA rank {net.rank} alpha {net.alpha:g}{conv} ({counts}; {params:,} parameters)"

    def param_groups(self) -> list[dict]:
        return [{"params": lora.lora_parameters(model), "lr": lr, "name": name}
                for name, (model, _, lr) in self.models.items()]

    def set_train(self, training: bool) -> None:
        for model, _, _ in self.models.values():
            model.train(training)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.kohya_weights(torch.float32)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for model, targets, _ in self.models.values():
            lora.load_kohya_into(model, targets, state)

    def after_backward(self) -> None:
        pass

    def kohya_weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {}
        for model, targets, _ in self.models.values():
            out.update(lora.kohya_state_dict(model, targets, dtype))
        return out

    def save(self, path: Path, progress: Progress) -> None:
        metadata = {**self.metadata, "ss_steps": str(progress.global_step), "ss_epoch": str(progress.epoch),
                    "ss_training_finished_at": str(int(time.time()))}
        dtype = SAVE_DTYPES[self.config.save.precision]
        atomic_save_safetensors(self.kohya_weights(dtype), path, metadata)


def base_model_version(parts: ModelParts) -> tuple[str, str]:
    """(ss_base_model_version, modelspec.architecture) as sd-scripts writes them."""
    if parts.family == "sd2":
        return ("sd_v2_v", "stable-diffusion-v2-768-v") if parts.v_prediction else ("sd_v2", "stable-diffusion-v2-512")
    return "sd_v1", "stable-diffusion-v1"


def tag_frequency(scan: DatasetScan) -> dict[str, dict[str, int]]:
    frequency: dict[str, Counter] = {}
    for item in scan.items:
        folder = item.path.parent.name
        tags = [t.strip() for t in item.caption.split(",") if t.strip()]
        frequency.setdefault(folder, Counter()).update(tags)
    return {folder: dict(counter) for folder, counter in frequency.items()}


def lora_metadata(config: LoraRunConfig, parts: ModelParts, scan: DatasetScan, plan: TrainingPlan) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` strings A1111/ComfyUI/civitai show (all values must be strings)."""
    net, opt, train, ds = config.network, config.optimizer, config.train, config.dataset
    version, architecture = base_model_version(parts)
    dataset_dirs = {}
    for subset in scan.subsets:
        count = sum(1 for item in scan.items if item.path.parent == subset.image_dir)
        dataset_dirs[subset.image_dir.name] = {"n_repeats": subset.repeats, "img_count": count}
    network_args = {"conv_dim": str(net.conv_rank), "conv_alpha": str(net.conv_alpha)} if net.conv_rank else {}
    if net.dropout:
        network_args["dropout"] = str(net.dropout)
    now = int(time.time())
    values = {
        "ss_session_id": str(uuid.uuid4().int % 2**31),
        "ss_training_started_at": str(now),
        "ss_output_name": config.save.name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(net.rank),
        "ss_network_alpha": f"{net.alpha:g}",
        "ss_network_args": json.dumps(network_args),
        "ss_network_dropout": str(net.dropout),
        "ss_learning_rate": str(opt.lr),
        "ss_unet_lr": str(net.unet_lr or opt.lr) if net.train_unet else "0",
        "ss_text_encoder_lr": str(net.text_encoder_lr or opt.lr) if net.train_text_encoder else "0",
        "ss_optimizer": f"{opt.name}({json.dumps(opt.args)})" if opt.args else opt.name,
        "ss_lr_scheduler": opt.scheduler,
        "ss_lr_warmup_steps": str(resolve_warmup_steps(plan.total_steps, opt.warmup_steps, opt.warmup_ratio)),
        "ss_max_train_steps": str(plan.total_steps),
        "ss_num_epochs": str(plan.epochs),
        "ss_num_batches_per_epoch": str(plan.batches_per_epoch),
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_num_train_images": str(plan.train_samples),
        "ss_num_reg_images": str(plan.reg_samples),
        "ss_resolution": f"({ds.resolution}, {ds.resolution})",
        "ss_base_model_version": version,
        "ss_v2": str(parts.family == "sd2"),
        "ss_sd_model_name": Path(parts.source).name,
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
        "ss_dataset_dirs": json.dumps(dataset_dirs, ensure_ascii=False),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": config.save.name,
        "modelspec.resolution": f"{ds.resolution}x{ds.resolution}",
        "modelspec.prediction_type": "v" if parts.v_prediction else "epsilon",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
    }
    return values
