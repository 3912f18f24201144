"""tools/import_config.py: read an sd-scripts or kohya_ss GUI config, write the Kiln TOML (never over an
existing file unless asked), and say what was not brought over and whether the result validates."""
from __future__ import annotations

import argparse
import importlib
import json
import tomllib
from pathlib import Path

from library.atomic import write_text_atomically
from library.importing.convert import Imported, import_options, mapping_table, render_toml
from library.importing.sources import gui_table, read_dataset_config, read_kohya_gui, read_sdscripts_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="import_config.py", description=(
        "Convert an sd-scripts config (--config_file TOML, with its --dataset_config) or a kohya_ss GUI JSON "
        "config into a Kiln TOML for the matching trainer; every option that is not brought over is listed."))
    parser.add_argument("source", nargs="?", help="an sd-scripts .toml or a kohya_ss GUI .json")
    parser.add_argument("--dataset-config", help="the sd-scripts --dataset_config (default: the source's "
                                                 "dataset_config key)")
    parser.add_argument("-o", "--output", help="the Kiln TOML to write (default: <source>.kiln.toml)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--mapping-table", action="store_true", help="print the mapping tables (Markdown)")
    args = parser.parse_args(argv)
    if not args.source and not args.mapping_table:
        parser.error("name the config to import")
    return args


def _dataset_path(args: argparse.Namespace, options: dict, source: Path) -> Path | None:
    """--dataset-config, else the config's own dataset_config (as given, else beside the config)."""
    named = args.dataset_config or options.get("dataset_config")
    if not named:
        return None
    path = Path(named)
    if not path.is_file() and not path.is_absolute() and (source.parent / path).is_file():
        path = source.parent / path
    if not path.is_file():
        raise FileNotFoundError(f"dataset config not found: {named} (pass --dataset-config)")
    return path


def read_source(args: argparse.Namespace) -> tuple[Imported, list[str]]:
    source = Path(args.source)
    skipped: list = []
    if source.suffix.lower() == ".json":
        options, kind = read_kohya_gui(source, lambda *item: skipped.append(item)), "kohya_ss GUI"
    else:
        options, kind = read_sdscripts_config(source), "sd-scripts"
    dataset = _dataset_path(args, options, source)
    sources = [f"{source} ({kind})"] + ([f"{dataset} (dataset config)"] if dataset else [])
    return import_options(options, read_dataset_config(dataset) if dataset else None, skipped), sources


def validation_problems(imported: Imported) -> list[str]:
    """What Kiln's schema says about the result (paths are checked by --check on the training machine)."""
    from library.config.loading import ConfigError, RawConfig, validate_raw

    recipe = importlib.import_module(f"library.recipes.{imported.trainer}").RECIPE
    try:
        validate_raw(RawConfig(imported.data(), "imported config", None), recipe.config_class)
    except ConfigError as err:
        return err.problems
    return []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mapping_table:
        print(mapping_table() + "\n" + gui_table(), end="")
        return 0
    try:
        imported, sources = read_source(args)
    except (OSError, ValueError, tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        print(f"error: {args.source}: {err}")
        return 2
    output = Path(args.output or Path(args.source).with_suffix(".kiln.toml"))
    if output.exists() and not args.overwrite:
        print(f"error: {output} exists; pass --overwrite to replace it, or -o another file")
        return 2
    write_text_atomically(output, render_toml(imported, sources, str(output)))
    print(f"wrote {output} for {imported.trainer} from {', '.join(sources)}")
    print(f"not imported ({len(imported.not_imported)}):")
    for option, value, reason in imported.not_imported:
        print(f"  {option} = {value!r}: {reason}")
    for note in imported.notes:
        print(f"note: {note}")
    if problems := validation_problems(imported):
        print("the imported config does not validate yet; fix these in it:")
        print("\n".join(f"  - {p}" for p in problems))
    return 0
