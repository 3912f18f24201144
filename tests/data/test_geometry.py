"""Each sample's geometry (original size, crop, training size, flip) is exactly how its pixels were cut, which is
what SDXL's size conditioning states; and SDXL's text encodings cache with their pooled part."""
import numpy as np
import torch
from PIL import Image, ImageOps

from library.data.batches import TrainingData
from library.data.captions import CaptionOptions
from library.data.folders import ImageItem
from library.data.images import load_image, to_tensor
from library.data.sources import ConditioningSource
from library.models.builtin import build_builtin


def data(tmp_path, random_crop: bool) -> TrainingData:
    items = []
    for i, size in enumerate([(128, 96), (90, 140), (100, 100)]):
        pixels = np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        items.append(ImageItem(tmp_path / f"{i}.png", "c", True, 4, False, 0))
    return TrainingData(items, CaptionOptions(), 64, 3, seed=5, flip_aug=True, random_crop=random_crop,
                        sizes=[(64, 48), (48, 64), (64, 64)])


def test_centre_crop_geometry_states_the_original_size_crop_and_target(tmp_path):
    first = data(tmp_path, random_crop=False).geometry(0, flip=False)
    assert first.original_size == (128, 96) and first.target_size == (64, 48)
    assert (first.box.resized_width, first.box.resized_height) == (64, 48) and (first.crop_top, first.crop_left) == (0, 0)
    tall = data(tmp_path, random_crop=False).geometry(1, flip=False)
    assert (tall.box.resized_width, tall.box.resized_height) == (48, 75) and tall.crop_top == (75 - 64) // 2


def test_random_crops_and_flips_are_where_the_pixels_come_from(tmp_path):
    source = data(tmp_path, random_crop=True)
    seen = set()
    for epoch in range(3):
        for positions in source.epoch_batches(epoch):
            batch = source.batch(epoch, positions, step_seed=epoch * 100 + positions[0])
            assert batch == source.batch(epoch, positions, step_seed=epoch * 100 + positions[0])  # seeded
            for index, flip, geometry in zip(batch.item_indices, batch.flips, batch.geometry):
                width, height = geometry.target_size
                resized = load_image(source.items[index].path).resize(
                    (geometry.box.resized_width, geometry.box.resized_height), Image.Resampling.LANCZOS)
                shown = ImageOps.mirror(resized) if flip else resized  # the image as trained
                left, top = geometry.crop_left, geometry.crop_top
                expected = to_tensor(shown.crop((left, top, left + width, top + height)))
                assert torch.equal(source.pixels(index, flip, geometry.box), expected)
                seen.add((index, flip, left, top))
    assert len({(i, left, top) for i, _, left, top in seen}) > 6  # the crops really vary


def test_sdxl_text_encodings_cache_with_their_pooled_part():
    parts = build_builtin("tiny-sdxl")
    captions = ["a kiln pot", "", "a kiln pot"]  # "" (a dropped caption) is cached like any other
    plain = ConditioningSource(parts).encode(captions)
    cached = ConditioningSource(parts, cache=True)
    first, again = cached.encode(captions), cached.encode(captions[::-1])
    assert set(cached.cache) == {"a kiln pot", ""}
    assert torch.allclose(first.hidden_states, plain.hidden_states, atol=1e-6)
    assert torch.allclose(first.pooled, plain.pooled, atol=1e-6) and first.pooled.shape == (3, 48)
    assert torch.equal(again.pooled, first.pooled.flip(0))
