"""sd-scripts' caption options: keep_tokens_separator, wildcards picked per sample with the seed, the secondary
separator, per-folder prefix/suffix and loss_weight; and the pixel augmentations color_aug / face_crop_aug_range."""
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.data.augment import color_aug, face_crop, face_info
from library.data.batches import SubsetData, TrainingData
from library.data.captions import CaptionOptions, expand_wildcards, process_caption
from library.data.folders import ImageItem
from library.recipes.lora import RECIPE as LORA
from tests.helpers import resolved_run


def test_keep_tokens_separator_keeps_both_ends_in_place_and_never_reaches_the_encoder():
    options = CaptionOptions(shuffle=True, keep_tokens=5, keep_tokens_separator="|||")
    caption = "sks, woman ||| red hair, smiling, outdoors, dress ||| masterpiece, best quality"
    seen = set()
    for seed in range(30):
        text = process_caption(caption, options, random.Random(seed))
        tags = text.split(", ")
        assert "|||" not in text
        assert tags[:2] == ["sks", "woman"] and tags[-2:] == ["masterpiece", "best quality"]
        assert sorted(tags[2:-2]) == ["dress", "outdoors", "red hair", "smiling"]
        seen.add(tuple(tags))
    assert len(seen) > 5  # the middle is shuffled
    # without the separator in a caption, keep_tokens applies
    assert process_caption("a, b, c, d, e, f", options, random.Random(0)).startswith("a, b, c, d, e")
    plain = CaptionOptions(keep_tokens_separator="|||")
    assert process_caption("sks ||| red, blue", plain, random.Random(0)) == "sks, red, blue"


def test_wildcards_pick_one_option_per_sample_from_the_seed():
    caption = "a {red|green|blue} pot, {{literal}}"
    picks = {expand_wildcards(caption, random.Random(seed)) for seed in range(40)}
    assert picks == {f"a {colour} pot, {{literal}}" for colour in ("red", "green", "blue")}
    assert expand_wildcards(caption, random.Random(7)) == expand_wildcards(caption, random.Random(7))
    options = CaptionOptions(wildcards=True)
    assert process_caption("{x|y}", options, random.Random(1)) in ("x", "y")
    assert process_caption("{x|y}", CaptionOptions(), random.Random(1)) == "{x|y}"  # off: left as written


def test_secondary_separator_joins_tags_that_move_and_drop_together():
    options = CaptionOptions(shuffle=True, secondary_separator=";;;")
    for seed in range(20):
        text = process_caption("sks, red;;;hair, blue;;;eyes, smile", options, random.Random(seed))
        assert "red, hair" in text and "blue, eyes" in text and ";;;" not in text


def test_defaults_draw_and_process_exactly_as_before():
    options = CaptionOptions(shuffle=True, keep_tokens=1, tag_dropout_rate=0.3)
    caption = "kiln pot, red, glazed, on a table, studio light"
    rng_a, rng_b = random.Random(5), random.Random(5)
    text = process_caption(caption, options, rng_a)
    tags = [t.strip() for t in caption.split(",")]
    fixed, rest = tags[:1], tags[1:]
    rng_b.shuffle(rest)
    rest = [t for t in rest if rng_b.random() >= 0.3]
    assert text == ", ".join(fixed + rest) and rng_a.random() == rng_b.random()


def test_subsets_set_their_own_prefix_suffix_and_loss_weight(tmp_path):
    body = """[dataset]
train_dir = ""
resolution = 64
caption_prefix = "photo"
[[dataset.subsets]]
image_dir = "{train}/10_kiln pot"
repeats = 1
caption_prefix = "sks"
caption_suffix = "masterpiece"
loss_weight = 2.5
[[dataset.subsets]]
image_dir = "{train}/10_kiln pot"
repeats = 1
"""
    _, run = resolved_run(LORA, tmp_path, body)
    data = run.data
    first = [i for i, item in enumerate(data.items) if item.subset_index == 0]
    second = [i for i, item in enumerate(data.items) if item.subset_index == 1]
    batch = data.batch(0, [data.samples.index(first[0]), data.samples.index(second[0])])
    assert batch.captions[0].startswith("sks, ") and batch.captions[0].endswith(", masterpiece")
    assert batch.captions[1].startswith("photo, ")
    assert batch.sample_weights == (2.5, 1.0)
    plain = data.batch(0, [data.samples.index(second[0])])
    assert plain.sample_weights is None  # weight 1 everywhere: the loop's old path


def test_color_aug_is_sd_scripts_hue_or_gamma_drawn_from_the_rng():
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    outcomes = [np.asarray(color_aug(image, random.Random(seed))) for seed in range(60)]
    unchanged = sum(np.array_equal(out, pixels) for out in outcomes)
    assert 20 < unchanged < 60  # applied with probability 0.33
    assert np.array_equal(np.asarray(color_aug(image, random.Random(3))), np.asarray(color_aug(image, random.Random(3))))
    # a run of draws that picks gamma: clip(p ** g, 0, 255) on raw values
    seed = next(s for s in range(200) if _picks_gamma(random.Random(s)))
    draws = random.Random(seed)
    draws.random(), draws.random()
    expected = np.clip(pixels.astype(np.float64) ** draws.uniform(0.95, 1.05), 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(color_aug(image, random.Random(seed))), expected)


def _picks_gamma(rng: random.Random) -> bool:
    return rng.random() <= 0.33 and rng.random() <= 0.5


def test_face_crop_reads_the_file_name_and_keeps_the_face_in_the_crop():
    assert face_info(Path("img_120_80_40_50.png")) == (120, 80, 40, 50)
    assert face_info(Path("img_1_2.png")) is None and face_info(Path("holiday_photo.png")) is None
    image = Image.new("RGB", (400, 300), "black")
    face = (300, 100, 40, 40)
    image.paste((255, 255, 255), (280, 80, 320, 120))  # the white face
    for seed in range(5):
        crop = face_crop(image, face, 64, 64, (2.0, 4.0), False, random.Random(seed))
        assert crop.size == (64, 64)
        values = np.asarray(crop.convert("L"), dtype=np.float32)
        bright = np.argwhere(values > 128)
        assert len(bright) > 0
        centre = bright.mean(axis=0)
        assert abs(centre[0] - 32) < 8 and abs(centre[1] - 32) < 8  # the face sits near the middle
        assert 64 / 4 <= np.sqrt(len(bright)) <= 64 / 2 + 1  # and spans 1/4 … 1/2 of the side


def test_training_data_applies_color_aug_only_to_fresh_pixels(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    item = ImageItem(path, "x", True, 1, False, 0)
    plain = TrainingData([item], CaptionOptions(), 64, 1, 0)
    augmented = TrainingData([item], CaptionOptions(), 64, 1, 0, color_aug=True,
                             subsets={0: SubsetData(CaptionOptions(), 1.0)})
    differing = sum(not plain.pixels(0, False, rng=random.Random(seed)).equal(
        augmented.pixels(0, False, rng=random.Random(seed))) for seed in range(30))
    assert 0 < differing < 30
    with pytest.raises(ValueError, match="2 bucket sizes for 1 items"):
        TrainingData([item], CaptionOptions(), 64, 1, 0, sizes=[(64, 64), (64, 64)])
