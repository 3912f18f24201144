"""Parameter counts read without loading a model, which --check uses to estimate the size of the saves."""
from __future__ import annotations

from pathlib import Path

import pytest

from library.models.builtin import build_builtin
from library.models.header import read_model_header
from library.models.paths import BUILTIN_MODELS, CONFIG_ROOT
from library.models.sizes import SIZES_FILE, measured_sizes, read_sizes_file


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_shipped_sizes_match_the_built_in_model(name):
    """Regenerate with `python -m library.models.sizes` when a built-in config changes."""
    model = build_builtin(name)
    assert read_sizes_file(CONFIG_ROOT / name / SIZES_FILE) == measured_sizes(model.unet, model.text_encoders,
                                                                              model.vae)


def test_a_single_file_header_gives_the_same_sizes_as_the_loaded_model(tmp_path: Path):
    from tools import convert_model

    path = tmp_path / "tiny.safetensors"
    assert convert_model.main(["builtin:tiny-sd15", str(path)]) == 0
    header = read_model_header(str(path))
    built = read_model_header("builtin:tiny-sd15")
    assert header.sizes is not None and built.sizes is not None
    for part in ("unet", "text", "vae"):  # a single file also stores a few buffers (position ids)
        assert abs(header.sizes[part].params - built.sizes[part].params) <= built.sizes[part].params // 1000, part
    assert header.sizes["unet"].adapter_io == built.sizes["unet"].adapter_io


def test_a_diffusers_folder_gives_its_sizes_from_the_safetensors_headers(tmp_path: Path):
    from tools import convert_model

    assert convert_model.main(["builtin:tiny-sd15", str(tmp_path / "folder")]) == 0
    sizes = read_model_header(str(tmp_path / "folder")).sizes
    assert sizes is not None and sizes["unet"] == read_model_header("builtin:tiny-sd15").sizes["unet"]
