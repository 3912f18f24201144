"""compare.py: the labelled grid layout and an X/Y plot over LoRA files and multipliers on the tiny model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import compare
from library.networks import lora
from library.networks.base import NetworkSpec
from library.networks.targets import unet_targets
from library.sampling.compare_axes import CompareError, parse_axis
from library.sampling.grid import make_grid
from library.models.builtin import build_builtin


def test_grid_has_every_cell_where_expected_and_drawn_labels():
    colours = {(x, y, 0): Image.new("RGB", (64, 48), (40 * x, 60 * y, 200)) for x in range(3) for y in range(2)}
    grid, layout = make_grid(colours, ["epoch 1", "epoch 2", "a much longer label that wraps"],
                             ["seed: 1", "seed: 2"], font_size=14)
    assert grid.size == layout.size
    assert grid.size[0] == layout.left + 3 * 64 and grid.size[1] == layout.top + 2 * 48
    for (x, y, z), image in colours.items():
        assert grid.crop(layout.cell_box(x, y, z)).tobytes() == image.tobytes()
    pixels = np.asarray(grid)
    top_strip, left_strip = pixels[: layout.top, layout.left:], pixels[layout.top:, : layout.left]
    assert layout.top > 14 and layout.left > 0
    assert (top_strip < 128).any() and (left_strip < 128).any()  # dark text on white
    for x in range(3):  # each column has its own label
        left, _, right, _ = layout.cell_box(x, 0)
        assert (pixels[: layout.top, left:right] < 128).any()


def test_z_axis_makes_side_by_side_blocks():
    cells = {(x, 0, z): Image.new("RGB", (32, 32), (0, 0, 0)) for x in range(2) for z in range(2)}
    grid, layout = make_grid(cells, ["a", "b"], [""], ["z: 1", "z: 2"], font_size=12)
    assert layout.blocks == 2 and layout.z_height > 0
    assert grid.size[0] == 2 * 2 * 32 + layout.gap
    assert grid.crop(layout.cell_box(1, 0, 1)).getextrema() == ((0, 0),) * 3


def test_axis_parsing(tmp_path):
    assert parse_axis("sr", 'dog, "cat, fluffy", fox').values == [("dog", "dog"), ("dog", "cat, fluffy"), ("dog", "fox")]
    assert parse_axis("seed", "1, 2").values == [1, 2]
    assert parse_axis("cfg_scale", "4,7.5").labels == ["cfg: 4", "cfg: 7.5"]
    for name in ("b-10.safetensors", "b-2.safetensors"):
        (tmp_path / name).write_bytes(b"")
    files = parse_axis("lora", f"none, {tmp_path.as_posix()}/b-*.safetensors")
    assert files.labels == ["none", "b-2", "b-10"]  # natural order: epoch 2 before epoch 10
    with pytest.raises(CompareError, match="nothing matches"):
        parse_axis("lora", str(tmp_path / "missing-*.safetensors"))
    with pytest.raises(CompareError, match="unknown axis kind"):
        parse_axis("colour", "red")


def _lora_file(path, seed: int) -> None:
    parts = build_builtin("tiny-sd15")
    targets = unet_targets(parts, with_conv=False)
    lora.add_lora(parts.unet, targets, NetworkSpec(rank=2, alpha=2))
    weights = lora.kohya_state_dict(parts.unet, targets, torch.float32)
    generator = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(v.shape, generator=generator) * 0.5 if "lora_up" in k else v for k, v in weights.items()}
    save_file(weights, str(path))


def test_compare_renders_grid_cells_and_metadata(tmp_path):
    _lora_file(tmp_path / "run-000001.safetensors", 1)
    out = tmp_path / "cmp"
    assert compare.main(["--model", "builtin:tiny-sd15", "--prompt", "a kiln pot", "--width", "64", "--height", "64",
                         "--steps", "2", "--x", "lora", f"none,{(tmp_path / 'run-*.safetensors').as_posix()}",
                         "--y", "multiplier", "0.5,1", "--output", str(out)]) == 0
    cells = sorted((out / "cells").glob("*.png"))
    assert len(cells) == 4
    image = {p.stem: np.asarray(Image.open(p)) for p in cells}
    # the base model is restored after each LoRA cell: both "none" cells are identical
    assert np.array_equal(image["x00-y00-z00"], image["x00-y01-z00"])
    assert not np.array_equal(image["x00-y00-z00"], image["x01-y00-z00"])
    assert not np.array_equal(image["x01-y00-z00"], image["x01-y01-z00"])  # the multiplier matters
    grid = Image.open(out / "grid.png")
    assert grid.width >= 2 * 64 and grid.height >= 2 * 64
    meta = json.loads(grid.text["kiln_compare"])
    assert meta["axes"]["x"] == {"kind": "lora", "values": ["none", "run-000001"]}
    assert meta["axes"]["y"]["values"] == ["multiplier: 0.5", "multiplier: 1"]
    assert "Steps: 2" in grid.text["parameters"]
    cell_meta = json.loads(Image.open(out / "cells" / "x01-y00-z00.png").text["kiln_compare"])
    assert cell_meta["multiplier"] == 0.5 and cell_meta["lora"].endswith("run-000001.safetensors")


def test_compare_reports_a_bad_search_string(tmp_path, capsys):
    assert compare.main(["--model", "builtin:tiny-sd15", "--prompt", "a pot", "--x", "sr", "vase,bowl",
                                   "--output", str(tmp_path)]) == 2
    assert "'vase' is not in the prompt" in capsys.readouterr().err


def test_lora_axis_applies_loha_and_lokr_files(tmp_path):
    from library.networks.kinds import kind_named

    for name in ("loha", "lokr"):
        parts = build_builtin("tiny-sd15")
        targets = unet_targets(parts, with_conv=False)
        kind = kind_named(name)
        kind.inject(parts.unet, targets, NetworkSpec(rank=2, alpha=2))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # peft starts one factor at zero; make the file change something
            for param in kind.parameters(parts.unet):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        save_file(kind.state_dict(parts.unet, targets, torch.float32), str(tmp_path / f"{name}.safetensors"))
    out = tmp_path / "cmp"
    files = ",".join((tmp_path / f"{name}.safetensors").as_posix() for name in ("loha", "lokr"))
    assert compare.main(["--model", "builtin:tiny-sd15", "--prompt", "a kiln pot", "--width", "64", "--height", "64",
                         "--steps", "2", "--x", "lora", f"none,{files}", "--output", str(out)]) == 0
    image = {p.stem: np.asarray(Image.open(p)) for p in (out / "cells").glob("*.png")}
    none, loha, lokr = image["x00-y00-z00"], image["x01-y00-z00"], image["x02-y00-z00"]
    assert not np.array_equal(none, loha) and not np.array_equal(none, lokr) and not np.array_equal(loha, lokr)


def _hypernetwork_file(path, seed: int) -> None:
    from library.networks.hypernetwork import Hypernetwork, save_hypernetwork, unet_widths
    from library.networks.hypernetwork_spec import HypernetworkSpec

    spec = HypernetworkSpec(weight_initialization="XavierNormal")
    network = Hypernetwork(spec, unet_widths(build_builtin("tiny-sd15")), "hn")
    save_hypernetwork(network.initialise(torch.Generator().manual_seed(seed)), path)


def test_hypernetwork_axis_applies_files_at_their_strengths(tmp_path):
    _hypernetwork_file(tmp_path / "hn.pt", 1)
    axis = parse_axis("hypernetwork", f"none, {(tmp_path / 'hn.pt').as_posix()}:0.5, {(tmp_path / '*.pt').as_posix()}")
    assert axis.labels == ["none", "hn:0.5", "hn"]
    out = tmp_path / "cmp"
    assert compare.main(["--model", "builtin:tiny-sd15", "--prompt", "a kiln pot", "--steps", "2", "--x", "hypernetwork",
                         f"none,{(tmp_path / 'hn.pt').as_posix()}:0.5,{(tmp_path / 'hn.pt').as_posix()}",
                         "--y", "seed", "1,1", "--output", str(out)]) == 0
    image = {p.stem: np.asarray(Image.open(p)) for p in (out / "cells").glob("*.png")}
    none, half, full = image["x00-y00-z00"], image["x01-y00-z00"], image["x02-y00-z00"]
    assert not np.array_equal(none, half) and not np.array_equal(half, full) and not np.array_equal(none, full)
    assert np.array_equal(none, image["x00-y01-z00"]) and np.array_equal(full, image["x02-y01-z00"])  # taken off
    cell = json.loads(Image.open(out / "cells" / "x01-y00-z00.png").text["kiln_compare"])
    assert cell["hypernetwork"].endswith("hn.pt") and cell["hypernetwork_strength"] == 0.5
    # --hypernetwork applies one file to every cell; a lora axis runs on top of it
    _lora_file(tmp_path / "l.safetensors", 2)
    out2 = tmp_path / "cmp2"
    assert compare.main(["--model", "builtin:tiny-sd15", "--prompt", "a kiln pot", "--steps", "2", "--hypernetwork",
                         f"{(tmp_path / 'hn.pt').as_posix()}:0.5", "--seed", "1", "--x", "lora",
                         f"none,{(tmp_path / 'l.safetensors').as_posix()}", "--output", str(out2)]) == 0
    assert np.array_equal(np.asarray(Image.open(out2 / "cells" / "x00-y00-z00.png")), half)
