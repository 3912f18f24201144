#!/usr/bin/env python
"""Prepare a dataset: auto-tag (WD14), caption (BLIP/GIT), batch-edit tags, count tags, crop around faces.

    python tag_images.py tag DIR --model MODEL_DIR_OR_REPO_ID [--mode skip|overwrite|append] ...
    python tag_images.py caption DIR --model BLIP_DIR [--prompt "a photo of"] ...
    python tag_images.py edit DIR [--remove TAGS] [--replace OLD NEW] [--regex] [--front TRIGGER] [--dedupe]
                                  [--keep-only FILE] [--dry-run]
    python tag_images.py freq DIR [--top N]
    python tag_images.py prepare SRC OUT --size 512 [--repeats 10 | --steps 1500 --epochs 10] --name "kiln pot"

Captions are `<image stem>.txt` beside each image (UTF-8). Changed captions are backed up first, into
DIR/.caption_backups/<timestamp>/. Run `python tag_images.py COMMAND --help` for every option.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from library.cli import run_main
from library.prep import crop

from library.prep import tag_edit

from library.prep import tagging


def _tags(values: list[str] | None) -> tuple[str, ...]:
    """Repeatable, comma-separated tag options ("--exclude 'a, b' --exclude c") as one tuple."""
    return tuple(tag for value in values or [] for tag in tag_edit.split_tags(value))


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="folder of images (subfolders such as 10_name/ are included)")
    parser.add_argument("--caption-ext", default=".txt", help="caption file extension (default .txt)")
    parser.add_argument("--no-recursive", action="store_true", help="only images directly in DIR")


def _add_write_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument("--model", required=True, help="model folder (or, for tag, a Hugging Face repo id)")
    parser.add_argument("--mode", choices=tagging.WRITE_MODES, default="skip",
                        help="existing captions: skip them (default), overwrite them, or append new tags")
    parser.add_argument("--trigger", action="append", help="tags always put first, e.g. your trigger word")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tag = commands.add_parser("tag", help="WD14 tags into caption files")
    _add_dataset_args(tag)
    _add_write_args(tag, batch_size=8)
    tag.add_argument("--general-threshold", type=float, default=0.35)
    tag.add_argument("--character-threshold", type=float, default=0.85)
    tag.add_argument("--rating", action="store_true", help="add the most likely rating tag (general, sensitive...)")
    tag.add_argument("--keep-underscores", action="store_true", help="write long_hair, not long hair")
    tag.add_argument("--exclude", action="append", help="tags never written (comma-separated, repeatable)")

    caption = commands.add_parser("caption", help="sentence captions from a local BLIP/GIT model folder")
    _add_dataset_args(caption)
    _add_write_args(caption, batch_size=4)
    caption.add_argument("--prompt", default="", help='text the caption continues, e.g. "a photograph of"')
    caption.add_argument("--max-new-tokens", type=int, default=40)
    caption.add_argument("--beams", type=int, default=3)

    edit = commands.add_parser("edit", help="batch tag edits across all caption files")
    _add_dataset_args(edit)
    edit.add_argument("--remove", action="append", help="tags to remove (comma-separated, repeatable)")
    edit.add_argument("--replace", nargs=2, action="append", metavar=("OLD", "NEW"),
                      help="replace tag OLD by NEW (NEW may be empty or hold commas); repeatable")
    edit.add_argument("--regex", action="store_true",
                      help="--remove/--replace take regular expressions (remove: whole tag; replace: inside tags)")
    edit.add_argument("--keep-only", type=Path, metavar="FILE", help="keep only the tags listed in FILE")
    edit.add_argument("--dedupe", action="store_true", help="drop repeated tags")
    edit.add_argument("--front", action="append", help="move (or add) these tags to the front, e.g. a trigger")
    edit.add_argument("--dry-run", action="store_true", help="show a per-file diff, change nothing")

    freq = commands.add_parser("freq", help="tag frequency table")
    _add_dataset_args(freq)
    freq.add_argument("--top", type=int, default=50, help="rows to show (0 = all)")

    prepare = commands.add_parser("prepare", help="crop around faces to a target size into OUT/NN_name/")
    prepare.add_argument("src", type=Path, help="folder of source images (captions beside them are copied)")
    prepare.add_argument("out", type=Path, help="output folder (e.g. your train_dir)")
    prepare.add_argument("--size", type=int, default=512, help="square target size (default 512)")
    prepare.add_argument("--width", type=int, help="target width (overrides --size)")
    prepare.add_argument("--height", type=int, help="target height (overrides --size)")
    prepare.add_argument("--name", help="class tokens / folder name (default: SRC's folder name)")
    prepare.add_argument("--repeats", type=int)
    prepare.add_argument("--steps", type=int, help="with --epochs: repeats = steps / (epochs x images)")
    prepare.add_argument("--epochs", type=int)
    prepare.add_argument("--batch-size", type=int, default=1, help="for the repeats formula (default 1)")
    prepare.add_argument("--focus", choices=crop.FOCUS_MODES, default="auto",
                         help="auto: faces, else the salient region, else the centre")
    prepare.add_argument("--face-zoom", type=float, help="crop to this multiple of the face size (e.g. 2.5)")
    prepare.add_argument("--flip", action="store_true", help="also write mirrored copies")
    prepare.add_argument("--format", choices=sorted(crop.IMAGE_FORMATS), default="png")
    prepare.add_argument("--caption-ext", default=".txt")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run_tag(args: argparse.Namespace) -> None:
    options = tagging.TagOptions(args.general_threshold, args.character_threshold, args.rating,
                                 not args.keep_underscores, _tags(args.exclude))
    images = tag_edit.require_images(args.dir, not args.no_recursive)
    tagger = tagging.WD14Tagger(tagging.resolve_tagger_model(args.model))
    print(f"tagging {len(images)} images in {args.dir} ({len(tagger.table.names)} tags, "
          f"{tagger.input_size}px input)")
    report = tagging.label_images(images, tagger.labeller(options), args.dir, args.mode, args.caption_ext,
                                  args.batch_size, _tags(args.trigger), progress=not args.quiet)
    print("\n".join(report.summary_lines()))


def run_caption(args: argparse.Namespace) -> None:
    images = tag_edit.require_images(args.dir, not args.no_recursive)
    captioner = tagging.Captioner(args.model, args.max_new_tokens, args.beams, args.prompt)
    print(f"captioning {len(images)} images in {args.dir} on {captioner.device}")
    report = tagging.label_images(images, captioner.labeller(), args.dir, args.mode, args.caption_ext,
                                  args.batch_size, _tags(args.trigger), progress=not args.quiet)
    print("\n".join(report.summary_lines()))


def run_edit(args: argparse.Namespace) -> None:
    removed = tuple(args.remove or []) if args.regex else _tags(args.remove)  # regexes may contain commas
    keep_only = tuple(tag_edit.read_tag_list(args.keep_only)) if args.keep_only else None
    edits = tag_edit.TagEdits(removed, tuple(map(tuple, args.replace or [])), args.regex, keep_only, args.dedupe,
                              _tags(args.front))
    if edits.is_empty():
        raise tag_edit.TagEditError("nothing to do: give --remove, --replace, --keep-only, --dedupe or --front")
    files, missing = tag_edit.find_captions(args.dir, args.caption_ext, not args.no_recursive)
    changes = [c for c in tag_edit.plan_edits(files, edits) if c.changed]
    if missing:
        print(f"{len(missing)} images have no caption file and are left alone")
    if args.dry_run:
        for change in changes:
            print(change.diff())
        print(f"dry run: {len(changes)} of {len(files)} caption files would change")
        return
    backup = tag_edit.Backup(args.dir)
    written = tag_edit.apply_changes(changes, backup)
    print(f"changed {written} of {len(files)} caption files")
    if backup.folder:
        print(f"previous captions backed up to {backup.folder}")


def run_freq(args: argparse.Namespace) -> None:
    files, _ = tag_edit.find_captions(args.dir, args.caption_ext, not args.no_recursive)
    print("\n".join(tag_edit.frequency_lines(tag_edit.tag_frequency(files), len(files), args.top or None)))


def run_prepare(args: argparse.Namespace) -> None:
    options = crop.PrepareOptions(args.width or args.size, args.height or args.size, args.focus, args.face_zoom,
                                  args.flip, args.format, args.caption_ext)
    name = args.name or args.src.resolve().name
    report = crop.prepare_dataset(args.src, args.out, name, options, args.repeats, args.steps, args.epochs,
                                  args.batch_size, progress=not args.quiet)
    print("\n".join(report.summary_lines()))


COMMANDS = {"tag": run_tag, "caption": run_caption, "edit": run_edit, "freq": run_freq, "prepare": run_prepare}


def main(argv: list[str] | None = None) -> int:
    """The command line: returns its exit code (2 for a problem with the arguments, files or settings)."""
    return run_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    COMMANDS[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
