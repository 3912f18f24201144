"""Loss masks: found beside the image, in a mask folder or in the alpha channel; cropped, flipped and bucketed
exactly as their image; cached on disk by content; missing or mis-sized masks listed before training; and a
masked-out region gets no gradient."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.errors import DatasetError
from library.data.masks import ALPHA, FILE, MaskSource, MaskSpec, compute_mask, mask_specs
from library.recipes.lora import RECIPE as LORA
from library.training.objective import Objective
from tests.helpers import SAMPLES, resolved_run


def half_mask(path: Path, size: tuple[int, int], left_white: bool = True) -> None:
    width, height = size
    values = np.zeros((height, width), dtype=np.uint8)
    values[:, : width // 2] = 255 if left_white else 0
    values[:, width // 2:] = 0 if left_white else 255
    Image.fromarray(values).save(path)


def test_a_mask_gets_its_images_crop_and_flip(tmp_path):
    mask = tmp_path / "wide.mask.png"
    values = np.zeros((64, 128), dtype=np.uint8)
    values[:, 32:64] = 255  # the left half of the centre crop (columns 32..95)
    Image.fromarray(values).save(mask)
    spec = MaskSpec(FILE, mask)
    weights = compute_mask(spec, 64, 64, False, 8)
    assert weights.shape == (1, 8, 8)
    assert torch.allclose(weights[0, :, :4], torch.ones(8, 4)) and torch.allclose(weights[0, :, 4:], torch.zeros(8, 4))
    assert torch.equal(compute_mask(spec, 64, 64, True, 8), weights.flip(-1))
    grey = tmp_path / "grey.mask.png"
    Image.new("L", (64, 64), 127).save(grey)
    assert compute_mask(MaskSpec(FILE, grey), 64, 64, False, 8).mean().item() == pytest.approx(127 / 255)


def test_alpha_masks_and_images_without_alpha(tmp_path):
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:, :32, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "b.png")
    weights = compute_mask(MaskSpec(ALPHA, tmp_path / "a.png"), 64, 64, False, 8)
    assert weights[0, :, :4].min() == 1 and weights[0, :, 4:].max() == 0
    assert torch.equal(compute_mask(MaskSpec(ALPHA, tmp_path / "b.png"), 64, 64, False, 8), torch.ones(1, 8, 8))


def test_missing_and_mis_sized_masks_are_listed_together(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 48)).save(tmp_path / f"{name}.png")
    half_mask(tmp_path / "a.mask.png", (64, 48))
    half_mask(tmp_path / "b.mask.png", (32, 32))
    images = [tmp_path / f"{n}.png" for n in "abc"]
    specs, problems = mask_specs(images, [FILE] * 3, [None] * 3)
    assert specs[0] == MaskSpec(FILE, tmp_path / "a.mask.png") and specs[2] is None
    assert len(problems) == 2
    assert "1 image(s) have no loss mask" in problems[0] and "c.mask.png" in problems[0]
    assert "b.mask.png: 32x32, its image" in problems[1] and "64x48" in problems[1]
    folder = tmp_path / "masks"
    folder.mkdir()
    half_mask(folder / "c.png", (64, 48))
    specs, problems = mask_specs(images[2:], [FILE], [folder])
    assert specs == [MaskSpec(FILE, folder / "c.png")] and problems == []


def masked_dataset(tmp_path: Path) -> Path:
    train = tmp_path / "train"
    shutil.copytree(SAMPLES, train)
    for image in sorted((train / "10_kiln pot").iterdir()):
        if image.suffix in (".png", ".jpg"):
            half_mask(image.with_name(image.stem + ".mask.png"), Image.open(image).size)
    return train


def test_masks_beside_the_images_are_not_training_images_and_are_cached_by_content(tmp_path):
    masked_dataset(tmp_path)
    _, run = resolved_run(LORA, tmp_path, "", ("dataset.masked_loss=true", "dataset.cache_latents=disk"))
    assert len(run.data.items) == 6 and all(spec is not None for spec in run.masks)
    assert not any(".mask" in item.path.name for item in run.data.items)
    source = MaskSource(run.data, run.masks, 8, tmp_path / "cache")
    source.fill()
    files = sorted((tmp_path / "cache" / "masks").rglob("*.safetensors"))
    assert 1 <= len(files) <= 6  # identical masks at identical sizes share one file
    before = {f: f.stat().st_mtime_ns for f in files}
    again = MaskSource(run.data, run.masks, 8, tmp_path / "cache")
    again.fill()
    assert {f: f.stat().st_mtime_ns for f in files} == before  # reused, not rewritten
    assert all(torch.equal(source.memory[k], again.memory[k]) for k in source.memory)
    edited = run.masks[0].path
    half_mask(edited, Image.open(edited).size, left_white=False)  # the mask changes: never served stale
    third = MaskSource(run.data, run.masks, 8, tmp_path / "cache")
    third.fill()
    assert len(list((tmp_path / "cache" / "masks").rglob("*.safetensors"))) == len(files) + 1
    assert torch.allclose(third.mask(0, False), 1 - source.mask(0, False), atol=1 / 255)


def test_a_missing_mask_stops_the_run_step_with_the_list(tmp_path):
    train = masked_dataset(tmp_path)
    next((train / "10_kiln pot").glob("*.mask.png")).unlink()
    with pytest.raises(DatasetError, match="have no loss mask"):
        resolved_run(LORA, tmp_path, "", ("dataset.masked_loss=true",))


def test_a_masked_out_region_gets_zero_gradient(tmp_path):
    masked_dataset(tmp_path)
    _, run = resolved_run(LORA, tmp_path, "", ("dataset.masked_loss=true", "dataset.flip_aug=true"))
    masks = MaskSource(run.data, run.masks, 8)
    batch = run.data.batch(0, run.data.epoch_batches(0)[0])
    weight = masks.weights(batch)
    assert weight.shape == (2, 1, 8, 8)
    from diffusers import DDPMScheduler
    objective = Objective(run.config.train, 1.0, DDPMScheduler(), False)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noised = objective.noised(latents, torch.Generator().manual_seed(1))
    prediction = torch.randn(2, 4, 8, 8, requires_grad=True)
    objective.loss(prediction, latents, noised, batch, weight).backward()
    grad = prediction.grad.abs().sum(dim=1, keepdim=True)
    assert (grad[weight == 0] == 0).all() and (grad[weight == 1] > 0).all()
    for index, flip in zip(batch.item_indices, batch.flips):  # black on the right, or on the left when flipped
        expected = masks.mask(index, False).flip(-1) if flip else masks.mask(index, False)
        assert torch.equal(masks.mask(index, flip), expected)
