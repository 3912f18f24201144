"""Damaged or foreign files: states cut short or holding pickled code, models cut short or pickled with code,
damaged network and embedding files, damaged latent cache entries. Each is refused (or rebuilt, for the cache)
with one line naming the file and what is wrong: never a traceback, never advice to unpickle, never the
pickle's code run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compare
import train_lora
import train_textual_inversion
from tests.faults.conftest import lora_run
from tests.faults.runner import exit_code, run_child
from tools import convert_model, extract_lora, merge_lora


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickled_code(path: Path, marker: Path, wrap=lambda obj: {"state_dict": {"x": obj}}) -> Path:
    torch.save(wrap(_Payload(marker)), path)
    return path


def cut_short(source: Path, target: Path, keep: float = 0.5) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def assert_one_line(capsys, code: int, *names: str) -> str:
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 2, text[-2000:]
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err[-2000:]
    assert "Traceback" not in text and "weights_only=False" not in text and "weights_only = False" not in text
    message = captured.err[captured.err.index("error:"):]  # one line, or one list under its line
    for name in names:
        assert name in message, message
    return message


@pytest.fixture(scope="module")
def single_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    assert convert_model.main(["builtin:tiny-sd15", str(path), "--precision", "fp32"]) == 0
    return path


@pytest.fixture(scope="module")
def state_run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished run with a state at step 2: (config, state folder)."""
    tmp = tmp_path_factory.mktemp("state")
    config = lora_run(tmp)
    assert run_child(train_lora.main, [str(config), "train.max_steps=3"]).code == 0
    return config, tmp / "out" / "t-step00000002-state"


def _copy_state(state: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(state, target)
    return target


@pytest.mark.parametrize("damage, named", [
    ("cut trainable", "trainable.safetensors"),
    ("pickled optimizer", "optimizer.pt"),
    ("cut optimizer", "optimizer.pt"),
    ("garbage progress", "progress.json"),
    ("missing scheduler", "scheduler.pt"),
], ids=lambda value: value.replace(" ", "-") if isinstance(value, str) else None)
def test_a_damaged_state_is_refused_in_one_line(damage, named, state_run, tmp_path, capsys):
    config, good = state_run
    state = _copy_state(good, tmp_path / "t-step00000002-state")
    marker = tmp_path / "code-ran"
    if damage == "cut trainable":
        cut_short(good / "trainable.safetensors", state / "trainable.safetensors")
    elif damage == "pickled optimizer":
        pickled_code(state / "optimizer.pt", marker, wrap=lambda obj: {"state": {0: obj}})
    elif damage == "cut optimizer":
        cut_short(good / "optimizer.pt", state / "optimizer.pt")
    elif damage == "garbage progress":
        (state / "progress.json").write_text("{not json")
    else:
        (state / "scheduler.pt").unlink()
    code = exit_code(train_lora.main, [str(config), f"save.resume={state}", f"save.output_dir={tmp_path / 'o'}"])
    assert_one_line(capsys, code, named)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["cut", "pickled"])
def test_a_damaged_model_is_one_line_in_every_script(kind, single_file, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    if kind == "cut":
        model = cut_short(single_file, tmp_path / "damaged.safetensors")
    else:
        model = pickled_code(tmp_path / "damaged.ckpt", marker)
    config = lora_run(tmp_path)
    commands = [
        (train_lora.main, [str(config), f"model.path={model}", "--check"]),
        (train_lora.main, [str(config), f"model.path={model}"]),
        (merge_lora.main, [str(model), str(tmp_path / "m.safetensors"), "--lora", str(single_file)]),
        (convert_model.main, [str(model), str(tmp_path / "c.safetensors")]),
        (extract_lora.main, [str(model), str(single_file), str(tmp_path / "e.safetensors"), "--rank", "2"]),
        (compare.main, ["--model", str(model), "--prompt", "a pot", "--out", str(tmp_path / "grid.png")]),
    ]
    for main, argv in commands:
        assert_one_line(capsys, exit_code(main, argv), model.name)
    assert not marker.exists()


def test_damaged_network_and_embedding_files_are_one_line(single_file, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    lora = tmp_path / "net.safetensors"
    lora.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    assert_one_line(capsys, exit_code(merge_lora.main, [str(single_file), str(tmp_path / "m.safetensors"),
                                                         "--lora", str(lora)]), lora.name)
    embedding = pickled_code(tmp_path / "kilnpot.pt", marker, wrap=lambda obj: {"string_to_param": {"*": obj}})
    config = lora_run(tmp_path, '[embedding]\nname = "kilnpot"\n')
    code = exit_code(train_textual_inversion.main, [str(config), f"embedding.resume={embedding}", "--check"])
    assert_one_line(capsys, code, embedding.name)
    assert not marker.exists()


def test_a_damaged_latent_cache_entry_is_rebuilt_with_one_line(tmp_path):
    config = lora_run(tmp_path)
    cache = tmp_path / "cache"
    args = [str(config), "dataset.cache_latents=disk", f"dataset.cache_dir={cache}", "train.max_steps=2"]
    assert run_child(train_lora.main, args).code == 0
    entry = sorted(cache.rglob("*.safetensors"))[0]
    cut_short(entry, entry, keep=0.3)
    again = run_child(train_lora.main, [*args, "save.overwrite=true"])
    assert again.code == 0, again.output[-3000:]
    assert f"latent cache: {entry}" in again.output and "rebuilding it" in again.output
    assert "Traceback" not in again.output
