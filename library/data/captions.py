"""Caption files and per-sample caption processing: decoding the same way on every OS, and kohya's order of
prefix/suffix, dropout, wildcards, keep_tokens (or keep_tokens_separator), shuffle, tag dropout and the
secondary separator."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from library.data.errors import DatasetError

# Caption extensions people's tools write; used to spot captions the configured extension does not match.
COMMON_CAPTION_EXTENSIONS = (".txt", ".caption", ".cap", ".tags")
# What an image without a caption file trains with: the LoRA and DreamBooth trainers (sd-scripts) use the folder's
# class tokens; textual inversion (A1111) uses the file name.
CLASS_TOKENS = "their folder's class tokens"
FILE_NAME = "their file name as [filewords] (as A1111 does: leading numbers and hyphens dropped)"


def _decode_caption(data: bytes) -> str:
    """Decode caption bytes the same way on every OS: UTF-8 (BOM allowed), or UTF-16 when it carries a BOM.
    Raises ValueError with the reason and the fix."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")  # Windows Notepad's "Unicode" encoding
        except UnicodeDecodeError:
            raise ValueError("starts with a UTF-16 byte-order mark but is not valid UTF-16; re-save it as "
                             "UTF-8") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at position {exc.start}); "
            "re-save it as UTF-8 (e.g. Notepad: Save As -> Encoding: UTF-8)"
        ) from None


def caption_or_problem(path: Path) -> tuple[str, str | None]:
    """(caption text, None), or ("", why it cannot be read and what to do) for an unreadable or undecodable
    file. The text: lines stripped and joined with ", " (empty lines dropped)."""
    try:
        text = _decode_caption(Path(path).read_bytes())
    except OSError as exc:
        return "", f"cannot be read ({exc.strerror or exc}); check that the file is readable"
    except ValueError as exc:
        return "", str(exc)
    lines = [line.strip() for line in text.splitlines()]
    return ", ".join(line for line in lines if line), None


def read_caption(path: Path) -> str:
    """Caption text of `path` (see caption_or_problem); DatasetError naming the file when it cannot be read."""
    text, problem = caption_or_problem(path)
    if problem is not None:
        raise DatasetError(f"caption {path}: {problem}")
    return text


@dataclass(frozen=True)
class CaptionOptions:
    prefix: str = ""
    suffix: str = ""
    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0
    separator: str = ","
    keep_tokens_separator: str = ""  # sd-scripts': "fixed ||| shuffled ||| fixed at the end"
    secondary_separator: str = ""  # sd-scripts': "a;;;b" moves and drops as one tag, then reads "a, b"
    wildcards: bool = False  # sd-scripts' enable_wildcard: {a|b|c} becomes one option per sample


_WILDCARD = re.compile(r"\{([^}]+)\}")
_OPEN, _CLOSE = "\x00", "\x01"  # stand-ins for the escaped braces {{ and }}


def _join(*parts: str) -> str:
    return ", ".join(part for part in parts if part)


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """sd-scripts' wildcards: each {a|b|c} becomes one of its options, picked with `rng`; {{ and }} stand for
    literal braces. Nested braces are not supported (as in sd-scripts)."""
    caption = caption.replace("{{", _OPEN).replace("}}", _CLOSE)
    caption = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(_OPEN, "{").replace(_CLOSE, "}")


def _tags(text: str, separator: str) -> list[str]:
    return [tag for tag in (part.strip() for part in text.split(separator)) if tag]


def _split_kept(caption: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed, movable, fixed at the end): by keep_tokens_separator when the caption has it (tags before its
    first occurrence stay first, after a second one stay last), else the first keep_tokens tags stay first."""
    mark = opts.keep_tokens_separator
    if mark and mark in caption:
        fixed, rest = caption.split(mark, 1)
        rest, end = rest.split(mark, 1) if mark in rest else (rest, "")
        return _tags(fixed, opts.separator), _tags(rest, opts.separator), _tags(end.replace(mark, opts.separator),
                                                                                  opts.separator)
    tags = _tags(caption, opts.separator)
    keep = max(0, opts.keep_tokens)
    return tags[:keep], tags[keep:], []


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random) -> str:
    """Per-sample caption in sd-scripts' order: prefix/suffix -> whole-caption dropout -> wildcards -> split on
    the separator -> keep the first `keep_tokens` tags (prefix tags count, as in kohya) or those around
    keep_tokens_separator -> shuffle the rest -> per-tag dropout on the rest -> join with ", " -> the secondary
    separator becomes ", ". Empty tags are removed, and keep_tokens_separator never reaches the text encoder.
    `rng` is only drawn from for enabled random steps."""
    if not opts.separator:
        raise ValueError("caption separator must not be empty")
    caption = _join(opts.prefix.strip(), caption.strip(), opts.suffix.strip())
    if opts.dropout_rate > 0 and rng.random() < opts.dropout_rate:
        return ""
    if opts.wildcards:
        caption = expand_wildcards(caption, rng)
    fixed, rest, end = _split_kept(caption, opts)
    if opts.shuffle:
        rng.shuffle(rest)
    if opts.tag_dropout_rate > 0:
        rest = [tag for tag in rest if rng.random() >= opts.tag_dropout_rate]
    text = ", ".join(fixed + rest + end)
    if opts.secondary_separator:
        text = ", ".join(_tags(text.replace(opts.secondary_separator, opts.separator), opts.separator))
    return text
