"""sd-scripts options (+ dataset config) → a Kiln config for the matching trainer, with every option that was
not brought over listed with its reason (never dropped silently), and the TOML text the importer writes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import tomli_w

from library.config.trainers import TRAINER_SCRIPTS
from library.importing.rules import RULES, RULES_BY_OPTION, NotImported, Rule, detect_trainer

# dataset-config keys that sd-scripts allows per subset but Kiln sets once for the whole dataset
_PER_DATASET = ("shuffle_caption", "keep_tokens", "caption_dropout_rate", "caption_tag_dropout_rate", "flip_aug",
                "random_crop", "color_aug", "face_crop_aug_range")
# per-subset keys that only act on captions containing them: any subset's value serves every folder
_ANY_SUBSET = ("keep_tokens_separator", "secondary_separator", "enable_wildcard")
# values that change nothing (sd-scripts' defaults, or settings of features that are off), read as unset
_NO_EFFECT = {"min_timestep": 0, "max_timestep": 1000, "loss_type": "l2", "huber_schedule": "snr", "huber_c": 0.1,
              "huber_scale": 1.0, "multires_noise_discount": 0.3, "max_token_length": 75, "prior_loss_weight": 1.0,
              "max_data_loader_n_workers": 0, "network_dropout": 0,
              "scale_weight_norms": 0, "caption_dropout_every_n_epochs": 0, "vae_batch_size": 0}
_SUBSET_KEYS = {"image_dir": "image_dir", "num_repeats": "repeats", "class_tokens": "class_tokens",
                "is_reg": "is_reg", "caption_prefix": "caption_prefix", "caption_suffix": "caption_suffix",
                "alpha_mask": "alpha_mask"}
_SECTION_ORDER = ("model", "dataset", "network", "embedding", "dreambooth", "optimizer", "train", "save",
                  "logging", "sample")


@dataclass
class Imported:
    trainer: str
    values: dict[str, Any] = field(default_factory=dict)  # "section.key" → value
    subsets: list[dict] = field(default_factory=list)
    not_imported: list[tuple[str, Any, str]] = field(default_factory=list)  # (option, value, reason)
    unset: list[str] = field(default_factory=list)  # options present but unset or off: nothing to bring over
    notes: list[str] = field(default_factory=list)  # choices the importer made that the user should know

    def skip(self, option: str, value: Any, reason: str) -> None:
        self.not_imported.append((option, value, reason))

    def data(self) -> dict:
        """The Kiln config as nested tables, sections in the usual order."""
        nested: dict = {"trainer": self.trainer}
        for dotted, value in sorted(self.values.items(), key=lambda kv: _section_rank(kv[0])):
            section, key = dotted.split(".", 1)
            nested.setdefault(section, {})[key] = value
        if self.subsets:
            nested.setdefault("dataset", {})["subsets"] = self.subsets
        return nested


def _section_rank(dotted: str) -> int:
    section = dotted.split(".", 1)[0]
    return _SECTION_ORDER.index(section) if section in _SECTION_ORDER else len(_SECTION_ORDER)


def _is_unset(value: Any, rule: Rule | None) -> bool:
    if value is None or value == "" or value == [] or value == {}:
        return True
    if rule is not None and rule.option in _NO_EFFECT and value == _NO_EFFECT[rule.option] and \
            not isinstance(value, bool):
        return True
    return value is False and not (rule and rule.keep_false)


def _apply(result: Imported, option: str, value: Any, options: dict) -> None:
    rule = RULES_BY_OPTION.get(option)
    if _is_unset(value, rule):
        result.unset.append(option)
        return
    if rule is None:
        result.skip(option, value, "not an sd-scripts option Kiln knows")
    elif rule.trainers and result.trainer not in rule.trainers:
        result.skip(option, value, f"applies to {', '.join(TRAINER_SCRIPTS[t] for t in rule.trainers)} configs, "
                                   f"not {TRAINER_SCRIPTS[result.trainer]}")
    elif not rule.kiln:
        result.skip(option, value, rule.note)
    else:
        try:
            converted = rule.convert(value, options, result.skip) if rule.convert else {rule.kiln: value}
        except (NotImported, ValueError, TypeError) as err:
            result.skip(option, value, str(err))
            return
        result.values.update(converted)


def _subset(index: int, subset: dict, dataset_level: dict, result: Imported) -> dict | None:
    """One [[datasets.subsets]] → a Kiln [[dataset.subsets]] entry (None when it cannot train in Kiln)."""
    where = f"subsets[{index}]"
    if "metadata_file" in subset or "image_dir" not in subset:
        result.skip(f"{where}", subset.get("image_dir", subset.get("metadata_file")),
                    "fine-tuning (metadata_file) subsets are not supported: use an image folder with captions")
        return None
    entry = {kiln: subset[key] for key, kiln in _SUBSET_KEYS.items() if key in subset}
    extension = subset.get("caption_extension", dataset_level.get("caption_extension"))
    if extension and extension != dataset_level.get("caption_extension"):
        entry["caption_extension"] = extension
    if subset.get("conditioning_data_dir"):  # sd-scripts' masked-loss subset: its masks, named like the images
        entry.update(mask_dir=subset["conditioning_data_dir"], masked_loss=True)
    handled = set(_SUBSET_KEYS) | set(_PER_DATASET) | set(_ANY_SUBSET) | {"caption_extension", "conditioning_data_dir"}
    for key, value in subset.items():
        if key not in handled:
            rule = RULES_BY_OPTION.get(key)
            if not _is_unset(value, rule):
                result.skip(f"{where}.{key}", value, rule.note if rule and not rule.kiln else
                            "not a subset setting Kiln has")
    return entry


def _same_for_all(key: str, subsets: list[dict], level: dict, fallback: Any, result: Imported) -> None:
    """A per-subset caption/augmentation key becomes the dataset's when every training subset agrees; otherwise
    the first one's value is used and the others are listed. `fallback`: the value a subset without it gets."""
    values = [(i, s.get(key, fallback)) for i, s in enumerate(subsets)]
    training = [value for (i, value), s in zip(values, subsets) if not s.get("is_reg")]
    if not training:
        return
    first = training[0]
    if first is not None:
        level[key] = first
    for i, value in values:
        if value != first:
            result.skip(f"subsets[{i}].{key}", value,
                        f"Kiln sets dataset.{key} for every folder: the first folder's value ({first!r}) is used")


def _from_any_subset(key: str, subsets: list[dict], level: dict, result: Imported) -> None:
    """A caption key that changes only captions containing it (a separator, wildcards) serves every folder: a
    subset's value becomes the dataset's; differing values after the first are listed."""
    values = [(i, s[key]) for i, s in enumerate(subsets) if s.get(key) not in (None, "", False)]
    if not values or level.get(key) not in (None, "", False):
        return
    level[key] = values[0][1]
    for i, value in values[1:]:
        if value != values[0][1]:
            result.skip(f"subsets[{i}].{key}", value, f"Kiln sets dataset.{key} for every folder: "
                                                      f"{values[0][1]!r} is used")


def dataset_options(options: dict, config: dict, result: Imported) -> dict:
    """Fold a dataset config into the options, with sd-scripts' precedence (subset > dataset > [general] >
    the training config) and Kiln's single dataset: the first [[datasets]] sets the dataset-wide values."""
    datasets = config.get("datasets") or [{}]
    level = {**config.get("general", {}), **{k: v for k, v in datasets[0].items() if k != "subsets"}}
    if "batch_size" in level:
        level["train_batch_size"] = level.pop("batch_size")
    for index, extra in enumerate(datasets[1:], 1):
        for key, value in extra.items():
            if key != "subsets" and level.get(key) != value:
                result.skip(f"datasets[{index}].{key}", value, "Kiln trains one dataset: its folders join the "
                                                               "first's settings")
    subsets = [s for d in datasets for s in d.get("subsets", [])]
    for key in _PER_DATASET:
        _same_for_all(key, subsets, level, level.get(key, options.get(key)), result)
    for key in _ANY_SUBSET:
        _from_any_subset(key, subsets, level, result)
    merged = {**options, **level}
    for key in ("train_data_dir", "reg_data_dir"):
        if merged.pop(key, None):
            result.skip(key, options[key], "sd-scripts ignores it when dataset_config is given")
    for index, subset in enumerate(subsets):
        if (entry := _subset(index, subset, merged, result)) is not None:
            result.subsets.append(entry)
    return merged


def _defaults(result: Imported, options: dict) -> None:
    """Where the source leaves a setting to sd-scripts' default and Kiln's differs, write sd-scripts' value."""
    values, note = result.values, result.notes.append
    if "train.epochs" in values and values.pop("train.max_steps", None) is not None:
        note("max_train_epochs and max_train_steps are both set: the epochs win, as in sd-scripts")
    if "train.epochs" not in values and "train.max_steps" not in values:
        values["train.max_steps"] = 1600
        note("no length set: train.max_steps = 1600, sd-scripts' default")
    wanted = {"dataset.caption_extension": (".caption", "sd-scripts' default caption extension"),
              "dataset.cache_latents": ("off", "sd-scripts encodes every step unless cache_latents is set")}
    if result.trainer == "lora":
        wanted.update({"network.rank": (4, "sd-scripts' default network_dim"),
                       "network.alpha": (1.0, "sd-scripts' default network_alpha")})
    if result.trainer != "textual_inversion":
        wanted["save.name"] = ("last", "sd-scripts names the file \"last\" without output_name")
    if "optimizer.lr" not in values and result.trainer != "textual_inversion":
        wanted["optimizer.lr"] = (2e-6, "sd-scripts' default learning_rate")
    if result.trainer == "textual_inversion" and "embedding.template" not in values:
        wanted["embedding.template"] = (["[filewords]"], "sd-scripts trains on the captions, which must contain "
                                                         "the token, unless a template option is set")
    for key, (value, why) in wanted.items():
        if key not in values:
            values[key] = value
            note(f"{key} = {value!r}: {why}")
    if values.get("dataset.caption_extension") == "":
        values["dataset.caption_extension"] = ".caption"
        note("caption_extension is empty: \".caption\", sd-scripts' default")


def import_options(options: dict, dataset_config: dict | None = None,
                   skipped: list[tuple[str, Any, str]] = ()) -> Imported:
    """sd-scripts options (a training config, or what a GUI config passes) + an optional dataset config → the
    Kiln config; `skipped`: keys the reader already left out, with reasons."""
    result = Imported(detect_trainer(options), not_imported=list(skipped))
    if dataset_config is not None:
        options = dataset_options(options, dataset_config, result)
    for option, value in options.items():
        _apply(result, option, value, options)
    _defaults(result, options)
    return result


def _comment_block(title: str, lines: list[str]) -> list[str]:
    return [f"# {title}", *(f"#   {line}" for line in lines)] if lines else []


def _wrapped(words: list[str], width: int = 108) -> list[str]:
    lines, current = [], ""
    for word in words:
        if current and len(current) + len(word) + 2 > width:
            lines.append(current + ",")
            current = ""
        current = f"{current}, {word}" if current else word
    return lines + ([current] if current else [])


def render_toml(result: Imported, sources: list[str], output: str) -> str:
    """The Kiln TOML, headed by what was not imported (with reasons), what the importer chose, and the options
    that were unset in the source."""
    script = TRAINER_SCRIPTS[result.trainer]
    header = [f"# Kiln config imported by tools/import_config.py from: {', '.join(sources)}",
              f"# Check it before training:  python {script} {output} --check", "#"]
    not_imported = [f"{option} = {value!r}: {reason}" for option, value, reason in result.not_imported]
    header += _comment_block(f"Not imported ({len(not_imported)}); set by hand what matters:", not_imported)
    header += _comment_block("Chosen by the importer:", result.notes)
    header += _comment_block("Unset or off in the source (nothing to bring over):", _wrapped(result.unset))
    return "\n".join(header) + "\n\n" + tomli_w.dumps(result.data())


def mapping_table() -> str:
    """README's "sd-scripts option → Kiln key" table, from the rules."""
    rows = ["| sd-scripts option | Kiln key | notes |", "|---|---|---|"]
    for rule in RULES:
        kiln = f"`{rule.kiln}`" if rule.kiln and not rule.kiln.startswith("(") else (rule.kiln or "not imported")
        only = f" ({', '.join(rule.trainers)} only)" if rule.trainers else ""
        rows.append(f"| `{rule.option}` | {kiln} | {(rule.note.replace('|', '/') + only).strip()} |")
    return "\n".join(rows) + "\n"
