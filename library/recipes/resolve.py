"""The run step between a valid config and a loaded model: scan the dataset, balance regularisation images,
assign buckets, plan the steps and resolve every key that needs interpreting — once — into a ResolvedRun
(latent mode, draw and cache folder, warmup, schedule, device, dtypes). Nothing here loads model weights."""
from __future__ import annotations

from pathlib import Path

from library.config.schema import DatasetSection, RunConfig
from library.data.batches import TrainingData
from library.data.buckets import BucketSettings, assign_buckets, auto_bucket_range
from library.data.captions import CaptionOptions
from library.data.errors import DatasetError
from library.data.folders import (DatasetScan, Subset, balance_reg_items, reg_balance_message, scan_subsets, subsets_from_folder)
from library.data.latent_cache import default_cache_dir
from library.recipes.base import Recipe
from library.training.device import SAVE_DTYPES, WEIGHT_DTYPES, resolve_device
from library.training.plan import make_plan
from library.training.resolved import ResolvedRun
from library.training.schedules import resolve_warmup_steps

_BUCKET_KEYS = ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")


def bucket_settings(ds: DatasetSection) -> BucketSettings:
    """The bucket settings of a [dataset] section, automatic min/max resolved."""
    low, high = auto_bucket_range(ds.resolution, ds.bucket_reso_steps, ds.min_bucket_reso, ds.max_bucket_reso)
    return BucketSettings(ds.resolution, low, high, ds.bucket_reso_steps, ds.bucket_no_upscale)


def ignored_bucket_keys(ds: DatasetSection) -> list[str]:
    """Bucket keys set in a config whose enable_buckets is false (reported, never silently ignored)."""
    if ds.enable_buckets:
        return []
    defaults = DatasetSection.model_fields
    return [f"dataset.{k}" for k in _BUCKET_KEYS if getattr(ds, k) != defaults[k].default]


def latent_cache_dir(ds: DatasetSection) -> Path:
    """dataset.cache_dir, or the default beside the images."""
    if ds.cache_dir:
        return Path(ds.cache_dir).expanduser()
    return default_cache_dir(ds.train_dir, [s.image_dir for s in ds.subsets if not s.is_reg] +
                             [s.image_dir for s in ds.subsets])


def dataset_subsets(ds: DatasetSection, extra: list[Subset] | None = None) -> list[Subset]:
    """The run's folders: train_dir's and reg_dir's NN_name folders, explicit subsets, and a recipe's extras."""
    subsets = []
    if ds.train_dir:
        subsets += subsets_from_folder(Path(ds.train_dir), False, ds.caption_extension)
    if ds.reg_dir:
        subsets += subsets_from_folder(Path(ds.reg_dir), True, ds.caption_extension)
    for s in ds.subsets:
        subsets.append(Subset(Path(s.image_dir), s.repeats, s.class_tokens, s.is_reg,
                              s.caption_extension or ds.caption_extension))
    return subsets + list(extra or [])


def scan_dataset(ds: DatasetSection, extra: list[Subset] | None = None) -> DatasetScan:
    """Scan folders and images; bad images stop the run unless dataset.skip_bad_images is set."""
    scan = scan_subsets(dataset_subsets(ds, extra))
    if scan.bad_images and not ds.skip_bad_images:
        listed = "\n".join(f"  {path}: {reason}" for path, reason in scan.bad_images)
        raise DatasetError(f"{len(scan.bad_images)} image(s) cannot be read:\n{listed}\n"
                           "fix or remove them, or set dataset.skip_bad_images = true to train without them")
    if not scan.train_items:
        raise DatasetError("no readable training images were found (only regularisation images)")
    return scan


def check_writable(folder: Path, key: str) -> None:
    """Fail now, not after the model loaded, when an output folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".kiln-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{key}: cannot write to {folder} ({err.strerror or err}); choose another folder") from None


def _text_cache_problem(config: RunConfig, recipe: Recipe) -> str | None:
    key = recipe.text_encoder_trained_by(config)
    if config.dataset.cache_text_encoder_outputs and key:
        return (f"dataset.cache_text_encoder_outputs = true, but {key} = true changes the text encoder's outputs "
                f"every step: set {key} = false to cache them, or dataset.cache_text_encoder_outputs = false")
    return None


def _training_data(config: RunConfig, scan: DatasetScan, notes: list[str]) -> TrainingData:
    """Training items (reg repeats balanced as sd-scripts does), their buckets, captions and batching."""
    ds, train = config.dataset, config.train
    reg = scan.reg_items
    if reg:
        if message := reg_balance_message(scan.num_train_samples(), reg):
            notes.append(message)
        reg = balance_reg_items(scan.num_train_samples(), reg)
    items = scan.train_items + reg
    sizes = image_sizes = None
    if ds.enable_buckets:
        buckets = assign_buckets(items, bucket_settings(ds))
        sizes, image_sizes = buckets.sizes, buckets.image_sizes
        notes.extend(buckets.table_lines(items))
    elif ignored := ignored_bucket_keys(ds):
        notes.append(f"{', '.join(ignored)} have no effect while dataset.enable_buckets = false")
    captions = CaptionOptions(ds.caption_prefix, ds.caption_suffix, ds.shuffle_caption, ds.keep_tokens,
                              ds.caption_dropout_rate, ds.caption_tag_dropout_rate)
    return TrainingData(items, captions, ds.resolution, train.batch_size, train.seed, ds.flip_aug, ds.random_crop,
                        sizes, image_sizes)


def resolve(config: RunConfig, recipe: Recipe) -> ResolvedRun:
    """Scan, plan and resolve a valid config. DatasetError or ValueError (one line each) for what only the
    dataset shows."""
    ds, train, opt = config.dataset, config.train, config.optimizer
    scan = scan_dataset(ds, recipe.extra_subsets(config))
    if problem := _text_cache_problem(config, recipe):
        raise ValueError(problem)
    notes: list[str] = []
    data = _training_data(config, scan, notes)
    reg_samples = sum(item.repeats for item in data.items if item.is_reg)
    plan = make_plan(scan.num_train_samples(), reg_samples, train.batch_size, len(data.epoch_batches(0)),
                     train.gradient_accumulation_steps, train.max_steps, train.epochs)
    change = recipe.adjust_plan(config, plan)
    notes.extend(change.notes)
    cache_dir = latent_cache_dir(ds) if ds.cache_latents == "disk" else None
    if cache_dir is not None:
        notes.append(f"latent cache: {cache_dir} (dataset.cache_latents = \"disk\")")
        check_writable(cache_dir, "dataset.cache_dir")
    return ResolvedRun(
        config=config, scan=scan, data=data, plan=change.plan, latent_mode=ds.cache_latents,
        latent_draw=recipe.latent_draw(config, cached=ds.cache_latents != "off"), cache_dir=cache_dir,
        warmup_steps=resolve_warmup_steps(change.plan.total_steps, opt.warmup_steps, opt.warmup_ratio),
        lr_schedule=change.lr_schedule, device=resolve_device(train.device),
        weight_dtype=WEIGHT_DTYPES[train.mixed_precision], save_dtype=SAVE_DTYPES[config.save.precision],
        cache_text_encoder_outputs=ds.cache_text_encoder_outputs, notes=notes)
