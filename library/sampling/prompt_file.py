"""Preview prompt lines in kohya's syntax and sampler names. Pure Python (no torch), so config validation
can check a prompt file without loading diffusers.

    a photo of sks dog, masterpiece --n lowres, blurry --w 512 --h 768 --s 28 --l 7.5 --d 1234 --ss euler_a

One prompt per line; lines starting with `#` and blank lines are skipped. Options: --n negative prompt,
--w/--h size (multiples of 8), --s steps, --l CFG scale, --d seed, --ss sampler.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError

# canonical name -> A1111's infotext name
SAMPLERS = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpm++ 2m": "DPM++ 2M",
            "dpm++ 2m karras": "DPM++ 2M Karras"}


class PromptError(UserError, ValueError):
    """A prompt line or file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class PromptOptions:
    """What one prompt line sets; None = the caller's default."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int | None = None
    sampler: str | None = None

    def given(self) -> dict:
        """The options the line sets (prompt included), for dataclasses.replace on a default spec."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


def canonical_sampler(name: str) -> str:
    """"Euler a", "k_euler_a", "DPM++ 2M Karras", "dpmpp_2m_karras" ... → a key of SAMPLERS; ValueError if unknown."""
    key = re.sub(r"[\s_\-]+", " ", name.strip().lower()).replace("dpmpp", "dpm++").removeprefix("k ")
    key = {"euler a": "euler_a", "euler ancestral": "euler_a", "dpm++2m": "dpm++ 2m",
           "dpm++2m karras": "dpm++ 2m karras"}.get(key, key)
    if key not in SAMPLERS:
        raise PromptError(f"unknown sampler {name!r}; use one of: {', '.join(SAMPLERS)}")
    return key


_OPTION = re.compile(r"\s--(?=[a-z]+(?:\s|$))")
_NUMBER_KINDS = {"w": ("width", int), "h": ("height", int), "s": ("steps", int), "l": ("cfg_scale", float),
                 "d": ("seed", int)}


def _number(kind: str, text: str, cast):
    try:
        value = cast(text)
    except ValueError:
        raise ValueError(f"--{kind} needs a number, got {text!r}") from None
    if kind in "wh" and (value < 8 or value % 8):
        raise ValueError(f"--{kind} {value}: sizes must be positive multiples of 8")
    if kind == "s" and value < 1:
        raise ValueError(f"--s {value}: steps must be at least 1")
    if kind == "l" and value < 0:
        raise ValueError(f"--l {value}: the CFG scale cannot be negative")
    return value


def parse_prompt_line(line: str) -> PromptOptions | None:
    """One kohya prompt line → its options; None for a blank or `#` comment line. ValueError names the option."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    prompt, *options = _OPTION.split(f" {text}" if text.startswith("--") else text)
    values: dict = {}
    for option in options:
        kind, _, value = option.partition(" ")
        value = value.strip()
        if kind == "n":
            values["negative_prompt"] = value
        elif kind == "ss":
            values["sampler"] = canonical_sampler(value)
        elif kind in _NUMBER_KINDS:
            field, cast = _NUMBER_KINDS[kind]
            values[field] = _number(kind, value, cast)
        else:
            raise ValueError(f"unknown option --{kind}; known: --n --w --h --s --l --d --ss")
    if not prompt.strip():
        raise ValueError("the line has options but no prompt before them")
    return PromptOptions(prompt.strip(), **values)


def parse_prompt_lines(lines: list[str], source: str) -> list[PromptOptions]:
    """Every prompt in `lines`; PromptError names `source` and the line number of a bad line."""
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            parsed = parse_prompt_line(line)
        except ValueError as err:
            raise PromptError(f"{source}:{number}: {err}") from None
        if parsed is not None:
            prompts.append(parsed)
    return prompts


def read_prompt_file(path: str | Path) -> list[PromptOptions]:
    """The prompts of a kohya prompt file (UTF-8 text, one prompt per line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise PromptError(f"{path}: not UTF-8 text; re-save it as UTF-8") from None
    return parse_prompt_lines(text.splitlines(), str(path))


@dataclass(frozen=True)
class SampleSpec:
    """One preview image. Field meanings follow A1111's txt2img (and kohya's --n/--w/--h/--s/--l/--d/--ss)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = 0
    sampler: str = "ddim"

    def infotext(self) -> str:
        """A1111's `parameters` text, so PNG Info in the WebUI shows how the image was made."""
        negative = f"\nNegative prompt: {self.negative_prompt}" if self.negative_prompt else ""
        sampler = SAMPLERS[canonical_sampler(self.sampler)]
        return (f"{self.prompt}{negative}\nSteps: {self.steps}, Sampler: {sampler}, CFG scale: {self.cfg_scale:g}, "
                f"Seed: {self.seed}, Size: {self.width}x{self.height}")
