"""A run with every config key resolved once (library/recipes/resolve.py builds it): what the loop trains on,
for how long, where latents come from, the warmup, dtypes and device. Modules downstream read these values,
not the raw keys they came from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.config.schema import RunConfig
from library.data.batches import TrainingData
from library.data.buckets import BucketAssignment
from library.data.folders import DatasetScan
from library.data.masks import MaskSpec
from library.models.dtypes import PartDtypes
from library.training.plan import TrainingPlan


@dataclass
class ResolvedRun:
    config: RunConfig  # paths resolved; read directly only for keys no other step interprets
    scan: DatasetScan
    data: TrainingData
    plan: TrainingPlan
    latent_mode: str  # "memory" | "disk" | "off" (dataset.cache_latents)
    latent_draw: str  # see library/data/sources.py LATENT_DRAWS
    cache_dir: Path | None  # the disk latent cache folder, for latent_mode "disk"
    warmup_steps: int  # optimizer.warmup_steps or warmup_ratio × total steps
    lr_schedule: str | None  # an A1111 schedule string that replaces optimizer.scheduler, or None
    device: torch.device
    weight_dtype: torch.dtype  # compute dtype of the frozen weights (train.mixed_precision)
    save_dtype: torch.dtype  # save.precision
    cache_text_encoder_outputs: bool
    # what each part of the base model loads and stays in (the VAE's also decides the latent-encode precision);
    # fp32 everywhere unless given (recipes/resolve.py part_dtypes)
    part_dtypes: PartDtypes = field(default_factory=PartDtypes)
    notes: list[str] = field(default_factory=list)  # lines for the dataset summary
    buckets: BucketAssignment | None = None  # the aspect-ratio buckets, when dataset.enable_buckets
    lr_settings: tuple[str, ...] = ()  # the learning-rate keys in effect, "key = value" (Recipe.lr_settings)
    command: tuple[str, ...] = ()  # the command line that started the run, to print the one that continues it
    masks: list[MaskSpec | None] | None = None  # each data item's loss mask, when any folder has masks
    trained_dtype: torch.dtype = torch.float32  # the trained weights' dtype (train.full_bf16 / full_fp16)

    def run_shape(self) -> dict:
        """What a resumed run must share with this one for its data order and schedule to continue exactly."""
        train = self.config.train
        return {"total_steps": self.plan.total_steps, "seed": train.seed, "batch_size": train.batch_size,
                "gradient_accumulation_steps": train.gradient_accumulation_steps,
                "batches_per_epoch": self.plan.batches_per_epoch, "samples_per_epoch": self.plan.samples_per_epoch}
