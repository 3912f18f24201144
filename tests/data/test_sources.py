"""What the loop reads per step, directly: batches and their per-sample choices, latents drawn the four ways
from the three caches, and text-encoder outputs cached per caption."""
import pytest
import torch

from library.data.batches import TrainingData
from library.data.captions import CaptionOptions
from library.data.folders import ImageItem
from library.data.sources import ConditioningSource, LatentSource
from library.models.builtin import build_builtin
from tests.helpers import SAMPLES


@pytest.fixture(scope="module")
def parts():
    return build_builtin("tiny-sd15")


def sample_data(seed: int = 3, flip: bool = True) -> TrainingData:
    images = sorted(SAMPLES.rglob("*.png"))[:3]
    items = [ImageItem(path, "kiln pot, glaze", True, 2, False, 0) for path in images]
    return TrainingData(items, CaptionOptions(shuffle=True), 64, 2, seed=seed, flip_aug=flip)


def test_batches_depend_only_on_seed_epoch_and_position():
    first, again, other = sample_data(), sample_data(), sample_data(seed=4)
    assert first.epoch_batches(2) == again.epoch_batches(2)
    assert [first.epoch_batches(e) for e in range(4)] != [other.epoch_batches(e) for e in range(4)]
    positions = first.epoch_batches(1)[0]
    assert first.batch(1, positions) == again.batch(1, positions)  # captions and flips included
    assert sorted(p for b in first.epoch_batches(0) for p in b) == list(range(len(first.samples)))


def test_memory_cache_keeps_only_what_the_draw_needs(parts):
    data = sample_data()
    kept = {}
    for draw in ("once", "deterministic", "random"):
        source = LatentSource(data, parts.vae, "memory", seed=1, draw=draw)
        source.fill()
        kept[draw] = next(iter(source.memory.values()))
    assert isinstance(kept["once"], torch.Tensor) and isinstance(kept["deterministic"], torch.Tensor)
    assert isinstance(kept["random"], tuple)  # a new sample every step needs the distribution


def test_uncached_once_draws_the_cached_sample_and_step_draws_anew(parts):
    data = sample_data(flip=False)
    batch = data.batch(0, data.epoch_batches(0)[0])
    cached = LatentSource(data, parts.vae, "memory", seed=1)
    cached.fill()
    uncached = LatentSource(data, parts.vae, "off", seed=1)
    assert torch.allclose(cached.latents(batch, 0, 10), uncached.latents(batch, 0, 99), atol=1e-5)
    fresh = LatentSource(data, parts.vae, "off", seed=1, draw="step")
    assert not torch.allclose(fresh.latents(batch, 0, 10), fresh.latents(batch, 0, 11), atol=1e-4)
    assert torch.equal(fresh.latents(batch, 0, 10), fresh.latents(batch, 0, 10))


def test_invalid_latent_settings_are_refused(parts):
    with pytest.raises(ValueError, match="'step' draw"):
        LatentSource(sample_data(), parts.vae, "memory", seed=1, draw="step")
    with pytest.raises(ValueError, match="cache folder"):
        LatentSource(sample_data(), parts.vae, "disk", seed=1)


def test_text_encodings_match_the_family_and_are_cached_on_the_cpu(parts):
    captions = ["a kiln pot", "a jug"]
    plain = ConditioningSource(parts).encode(captions)
    with torch.no_grad():
        expected = parts.family.encode_text(parts, captions, 1).hidden_states
    assert torch.equal(plain.hidden_states, expected) and plain.pooled is None
    cached = ConditioningSource(parts, cache=True)
    cached.encode(captions)
    assert set(cached.cache) == set(captions)
    assert all(row.hidden_states.device.type == "cpu" for row in cached.cache.values())
