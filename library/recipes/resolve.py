"""The run step between a valid config and a loaded model: scan the dataset, balance regularisation images,
assign buckets, plan the steps and resolve every key that needs interpreting — once — into a ResolvedRun
(latent mode, draw and cache folder, warmup, schedule, device, dtypes). Nothing here loads model weights."""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from library.config.options import subset_mask_mode
from library.config.schema import DatasetSection, RunConfig, SubsetSection
from library.data.batches import SubsetData, TrainingData
from library.data.buckets import (BucketAssignment, BucketSettings, assign_buckets, auto_bucket_range,
                                  square_assignment, upscale_warning)
from library.data.captions import CaptionOptions
from library.data.captions import CLASS_TOKENS
from library.data.errors import DatasetError, DatasetProblem
from library.data.folders import (DatasetScan, Subset, balance_reg_items, collect_scan, find_subsets,
                                  reg_balance_message)
from library.data.latent_cache import default_cache_dir
from library.data.masks import MaskSpec, mask_specs
from library.models.dtypes import PartDtypes
from library.recipes.base import Recipe
from library.training.device import SAVE_DTYPES, WEIGHT_DTYPES, cpu_has_bf16, resolve_device
from library.training.launch import launch_info
from library.training.plan import FolderCount, make_plan
from library.training.precision import trained_dtype
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


def _dataset_roots(ds: DatasetSection) -> list[Path]:
    return [Path(folder) for folder in (ds.train_dir, ds.reg_dir) if folder]


def _find_dataset_subsets(ds: DatasetSection, extra: list[Subset] | None
                          ) -> tuple[list[Subset], list[DatasetProblem], list[Subset]]:
    """(subsets, problems of the folder layout, misnamed folders as provisional subsets)."""
    subsets, problems, misnamed = [], [], []
    for root, is_reg in ((ds.train_dir, False), (ds.reg_dir, True)):
        if root:
            found = find_subsets(Path(root), is_reg, ds.caption_extension)
            subsets, problems = subsets + found.subsets, problems + found.problems
            misnamed += found.misnamed
    for s in ds.subsets:
        subsets.append(Subset(Path(s.image_dir), s.repeats, s.class_tokens, s.is_reg,
                              s.caption_extension or ds.caption_extension))
    return subsets + list(extra or []), problems, misnamed


def scan_dataset(ds: DatasetSection, extra: list[Subset] | None = None, captionless: str = CLASS_TOKENS
                 ) -> DatasetScan:
    """Scan folders, captions and images in one pass and raise one DatasetError with every problem found,
    grouped by kind. Unreadable images and captions leave their images out instead when
    dataset.skip_bad_images is set (the summary lists them)."""
    subsets, problems, misnamed = _find_dataset_subsets(ds, extra)
    roots = _dataset_roots(ds)
    if not subsets and not misnamed:
        raise DatasetError(problems, roots)
    # misnamed folders are scanned too, so renaming them is not followed by another round of problems
    scan = collect_scan(subsets + misnamed, captionless=captionless)
    problems += scan.problems + ([] if ds.skip_bad_images else scan.unreadable())
    if problems:
        raise DatasetError(problems, roots, scan.notes)
    if not scan.train_items:
        left_out = [DatasetProblem("left_out", p.text) for p in scan.unreadable()]
        raise DatasetError(left_out or "no readable training images were found (only regularisation images)", roots)
    return scan


def check_writable(folder: Path, key: str) -> None:
    """Fail now, not after the model loaded, when an output folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # a name of its own: the processes of a data-parallel run check the same folders at the same time
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".kiln-write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"{key}: cannot write to {folder} ({err.strerror or err}); choose another folder") from None


def _text_cache_problem(config: RunConfig, recipe: Recipe) -> str | None:
    key = recipe.text_encoder_trained_by(config)
    if config.dataset.cache_text_encoder_outputs and key:
        return (f"dataset.cache_text_encoder_outputs = true, but {key} = true changes the text encoder's outputs "
                f"every step: set {key} = false to cache them, or dataset.cache_text_encoder_outputs = false")
    return None


def caption_options(ds: DatasetSection) -> CaptionOptions:
    """The [dataset] caption keys as per-sample caption processing options."""
    return CaptionOptions(ds.caption_prefix, ds.caption_suffix, ds.shuffle_caption, ds.keep_tokens,
                          ds.caption_dropout_rate, ds.caption_tag_dropout_rate,
                          keep_tokens_separator=ds.keep_tokens_separator, secondary_separator=ds.secondary_separator,
                          wildcards=ds.enable_wildcard)


def subset_sections(ds: DatasetSection, scan: DatasetScan, extra: int) -> list[SubsetSection | None]:
    """Per scanned folder, its [[dataset.subsets]] entry (None for NN_name folders and a recipe's extras)."""
    end = len(scan.subsets) - extra
    start = end - len(ds.subsets)
    return [ds.subsets[i - start] if start <= i < end else None for i in range(len(scan.subsets))]


def subset_data(ds: DatasetSection, sections: list[SubsetSection | None]) -> dict[int, SubsetData]:
    """What explicit subsets set for their own images: caption prefix/suffix and loss_weight."""
    base, found = caption_options(ds), {}
    for index, section in enumerate(sections):
        if section is None:
            continue
        prefix = base.prefix if section.caption_prefix is None else section.caption_prefix
        suffix = base.suffix if section.caption_suffix is None else section.caption_suffix
        captions = dataclasses.replace(base, prefix=prefix, suffix=suffix)
        if captions != base or section.loss_weight != 1.0:
            found[index] = SubsetData(captions, section.loss_weight)
    return found


def item_masks(ds: DatasetSection, scan: DatasetScan, sections: list[SubsetSection | None], extra: int,
               items: list) -> list[MaskSpec | None] | None:
    """Each training item's loss mask (None when no folder has masks). DatasetError listing every image whose
    mask file is missing, unreadable or of another size."""
    modes, dirs = [], []
    for index, (subset, section) in enumerate(zip(scan.subsets, sections)):
        is_extra = index >= len(scan.subsets) - extra
        modes.append(None if is_extra else subset_mask_mode(ds, section, subset.is_reg))
        if section is not None and section.mask_dir:
            dirs.append(Path(section.mask_dir))
        else:
            dirs.append(Path(ds.mask_dir) / subset.image_dir.name if ds.mask_dir else None)
    if not any(modes):
        return None
    specs, problems = mask_specs([item.path for item in items], [modes[item.subset_index] for item in items],
                                 [dirs[item.subset_index] for item in items])
    if problems:
        raise DatasetError(problems)
    return specs


def _training_data(config: RunConfig, scan: DatasetScan, notes: list[str], subsets: dict[int, SubsetData]
                   ) -> tuple[TrainingData, BucketAssignment | None]:
    """Training items (reg repeats balanced as sd-scripts does), their buckets, captions and batching."""
    ds, train = config.dataset, config.train
    reg = scan.reg_items
    if reg:
        if message := reg_balance_message(scan.num_train_samples(), reg):
            notes.append(message)
        reg = balance_reg_items(scan.num_train_samples(), reg)
    items = scan.train_items + reg
    sizes = image_sizes = buckets = None
    if ds.enable_buckets:
        buckets = assign_buckets(items, bucket_settings(ds))
        sizes, image_sizes = buckets.sizes, buckets.image_sizes
        notes.extend(buckets.table_lines(items))
    elif ignored := ignored_bucket_keys(ds):
        notes.append(f"{', '.join(ignored)} have no effect while dataset.enable_buckets = false")
    notes.extend(upscale_warning(items, buckets or square_assignment(items, ds.resolution)))
    face_range = tuple(ds.face_crop_aug_range) if ds.face_crop_aug_range else None
    return TrainingData(items, caption_options(ds), ds.resolution, train.batch_size, train.seed, ds.flip_aug,
                        ds.random_crop, sizes, image_sizes, subsets, ds.color_aug, face_range), buckets


def long_caption_notes(config: RunConfig, recipe: Recipe, scan: DatasetScan) -> list[str]:
    """Images whose prompts have more tokens than train.max_token_length reads (the rest would be cut)."""
    from library.models.clip_tokenizer import TokenizerUnavailable, count_clip_tokens

    limit = config.train.max_token_length
    texts = recipe.longest_prompts(config, scan.items)
    candidates = [(item, text) for item, text in zip(scan.items, texts) if len(text.encode("utf-8")) > limit]
    if not candidates:  # a token covers at least one byte: nothing this short can be too long
        return []
    try:
        counts = count_clip_tokens([text for _, text in candidates])
    except TokenizerUnavailable:
        return []  # the model's own tokenizer cuts them all the same; nothing to list without the vocabulary
    long = [(item.path, n) for (item, _), n in zip(candidates, counts) if n > limit]
    if not long:
        return []
    listed = [f"  {path} ({n} tokens)" for path, n in long[:10]] + ([f"  ... and {len(long) - 10} more"]
                                                                     if len(long) > 10 else [])
    longest = max(n for _, n in long)
    hint = "set train.max_token_length = 150 or 225" if longest <= 225 and limit < 225 else "shorten them"
    return [f"{len(long)} image(s) have prompts longer than train.max_token_length = {limit} tokens; the text "
            f"encoder reads only the first {limit} ({hint} to keep the rest):"] + listed


def _resumed_step(state_folder: Path) -> int:
    """The step a save.resume state was saved at (0 when it cannot tell; loading the state says why)."""
    try:
        return int(json.loads((state_folder / "progress.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def folder_counts(ds: DatasetSection, scan: DatasetScan, extra: int) -> tuple[FolderCount, ...]:
    """The training folders with their image counts, and what changes each one's repeats: an NN_name folder is
    renamed, an explicit [[dataset.subsets]] entry sets its `repeats`. `extra`: folders a recipe appended."""
    explicit_start = len(scan.subsets) - extra - len(ds.subsets)
    counts = []
    for index, subset in enumerate(scan.subsets):
        if subset.is_reg:
            continue
        images = sum(1 for item in scan.items if item.subset_index == index)
        if explicit_start <= index < len(scan.subsets) - extra:
            position = index - explicit_start
            how = f"set dataset.subsets[{position}].repeats = {{}}"
            label = f"dataset.subsets[{position}] {subset.image_dir}"
        else:
            rest = subset.image_dir.name.split("_", 1)[-1].replace("{", "{{").replace("}", "}}")
            how, label = f"rename the folder to {{}}_{rest}", str(subset.image_dir)
        counts.append(FolderCount(label, images, subset.repeats, how))
    return tuple(counts)


def part_dtypes(config: RunConfig, recipe: Recipe) -> PartDtypes:
    """The dtype each part of the base model loads and stays in: frozen weights in train.mixed_precision's
    compute dtype, what the recipe trains (and the VAE of a saved whole model) in fp32."""
    full_precision = recipe.trained_parts(config) | ({"vae"} if recipe.saves_base_model else set())
    weight_dtype = WEIGHT_DTYPES[config.train.mixed_precision]
    if weight_dtype == torch.bfloat16 and resolve_device(config.train.device).type == "cpu" and not cpu_has_bf16():
        full_precision |= {"vae"}  # its bf16 encode would take minutes per image there (training/device.py)
    return PartDtypes.for_run(weight_dtype, full_precision)


def resolve(config: RunConfig, recipe: Recipe) -> ResolvedRun:
    """Scan, plan and resolve a valid config. DatasetError or ValueError (one line each) for what only the
    dataset shows."""
    ds, train, opt = config.dataset, config.train, config.optimizer
    extra = recipe.extra_subsets(config)
    scan = scan_dataset(ds, extra, recipe.captionless)
    if problem := _text_cache_problem(config, recipe):
        raise ValueError(problem)
    notes: list[str] = long_caption_notes(config, recipe, scan)
    sections = subset_sections(ds, scan, len(extra))
    data, buckets = _training_data(config, scan, notes, subset_data(ds, sections))
    masks = item_masks(ds, scan, sections, len(extra), data.items)
    if masks is not None:
        notes.append(f"loss masks: {sum(spec is not None for spec in masks)} of {len(masks)} images have one")
    reg_samples = sum(item.repeats for item in data.items if item.is_reg)
    plan = make_plan(scan.num_train_samples(), reg_samples, train.batch_size, len(data.epoch_batches(0)),
                     train.gradient_accumulation_steps, train.max_steps, train.epochs,
                     folder_counts(ds, scan, len(extra)), launch_info().processes)
    if config.save.resume:
        plan = dataclasses.replace(plan, done=_resumed_step(Path(config.save.resume)))
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
        weight_dtype=WEIGHT_DTYPES[train.mixed_precision], part_dtypes=part_dtypes(config, recipe),
        save_dtype=SAVE_DTYPES[config.save.precision],
        cache_text_encoder_outputs=ds.cache_text_encoder_outputs, notes=notes, buckets=buckets, masks=masks,
        trained_dtype=trained_dtype(train.full_bf16, train.full_fp16), lr_settings=tuple(recipe.lr_settings(config)))
