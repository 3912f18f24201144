"""The disk latent cache: written by prepare_buckets.py or a training run, reused by any later run without
running the VAE, re-encoding exactly what changed, and never training on a damaged file. Also the
text-encoder output cache and its refusals."""
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

import prepare_buckets
import train_lora
from library.models.conditioning import encode_text, tokenize
from library.config.loading import ConfigError
from library.data.captions import CaptionOptions
from library.data.folders import ImageItem
from library.data.latent_cache import DiskLatentCache, LatentEntry, vae_identity
from library.models.builtin import build_builtin
from library.data.batches import Batch, TrainingData
from library.data.sources import ConditioningSource, LatentSource
from library.recipes.lora import RECIPE as LORA
from library.recipes.run import read_config
from tests.data.test_buckets import bucket_config


@pytest.fixture
def vae_calls(monkeypatch):
    """How many images went through AutoencoderKL.encode (any instance)."""
    calls = {"images": 0}
    original = AutoencoderKL.encode

    def counting(self, x, *args, **kwargs):
        calls["images"] += x.shape[0]
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    return calls


def cache_files(tmp: Path) -> list[Path]:
    return sorted((tmp / "train" / ".kiln-cache" / "latents").rglob("*.safetensors"))


def prepare(path: Path, *overrides: str) -> int:
    return prepare_buckets.main([str(path), *overrides])


def test_prepare_then_training_runs_no_vae_and_later_runs_reuse(tmp_path, vae_calls, capsys):
    path = bucket_config(tmp_path, extra='flip_aug = true\ncache_latents = "disk"')
    assert prepare(path) == 0
    out = capsys.readouterr().out
    assert "128x64    2.00       2             10" in out  # the bucket table
    assert "0 reused, 12 encoded" in out
    assert vae_calls["images"] == 12 and len(cache_files(tmp_path)) == 12  # 6 images + mirrored copies

    assert train_lora.main([str(path)]) == 0
    assert vae_calls["images"] == 12  # training used the cache: not one encode
    assert "12 reused, 0 encoded" in capsys.readouterr().out
    assert prepare(path) == 0
    assert vae_calls["images"] == 12
    assert "12 reused, 0 encoded" in capsys.readouterr().out


def test_training_writes_the_cache_and_a_second_run_encodes_nothing(tmp_path, vae_calls, capsys):
    path = bucket_config(tmp_path, extra='cache_latents = "disk"')
    assert train_lora.main([str(path)]) == 0
    assert vae_calls["images"] == 6 and len(cache_files(tmp_path)) == 6
    assert train_lora.main([str(path), "save.name=second", "train.seed=99"]) == 0  # another seed shares it
    assert vae_calls["images"] == 6
    assert "6 reused, 0 encoded" in capsys.readouterr().out


def test_only_what_changed_is_encoded_again(tmp_path, vae_calls, capsys):
    path = bucket_config(tmp_path)
    assert prepare(path) == 0 and vae_calls["images"] == 6
    edited = tmp_path / "train" / "5_thing" / "img2.png"
    Image.fromarray(np.full((190, 100, 3), 200, np.uint8)).save(edited)  # same size, new pixels
    assert prepare(path) == 0
    assert vae_calls["images"] == 7  # exactly the edited image
    assert "5 reused, 1 encoded" in capsys.readouterr().out
    # a narrower bucket range moves the four 2:1 images to 96x64 / 64x96; the squares keep their latents
    assert prepare(path, "dataset.max_bucket_reso=96") == 0
    assert vae_calls["images"] == 11
    assert "2 reused, 4 encoded" in capsys.readouterr().out
    assert prepare(path) == 0 and vae_calls["images"] == 11  # switching back finds the old entries


def test_damaged_cache_file_is_reported_and_rebuilt(tmp_path, vae_calls, capsys):
    path = bucket_config(tmp_path)
    assert prepare(path) == 0
    victim = cache_files(tmp_path)[0]
    victim.write_bytes(victim.read_bytes()[:-40])  # truncated, as by a full disk or a killed copy
    assert prepare(path) == 0
    out = capsys.readouterr().out
    assert f"{victim}" in out and "rebuilding it" in out and "1 corrupt file(s) rebuilt" in out
    assert vae_calls["images"] == 7
    assert prepare(path) == 0 and vae_calls["images"] == 7  # the rebuilt file is valid


def small_data(tmp: Path) -> TrainingData:
    folder = tmp / "imgs"
    folder.mkdir(exist_ok=True)
    items = []
    for i, size in enumerate([(80, 64), (64, 96), (70, 70)]):
        rng = np.random.default_rng(i)
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
        items.append(ImageItem(folder / f"{i}.png", "c", True, 1, False, 0))
    sizes = [(64, 64), (64, 96), (64, 64)]
    return TrainingData(items, CaptionOptions(), 64, 2, seed=11, flip_aug=True, sizes=sizes)


def test_memory_and_disk_caches_give_the_same_latents(tmp_path):
    vae = build_builtin("tiny-sd15").vae
    memory = LatentSource(small_data(tmp_path), vae, "memory", seed=4)
    disk = LatentSource(small_data(tmp_path), vae, "disk", seed=4, cache_dir=tmp_path / "cache")
    memory.fill()
    disk.fill()
    for batch in (Batch([], [0, 2, 0], ["c"] * 3, [False, True, True]), Batch([], [1], ["c"], [True])):
        assert torch.equal(memory.latents(batch, 0, 1), disk.latents(batch, 0, 1))
    other_seed = LatentSource(small_data(tmp_path), vae, "disk", seed=5, cache_dir=tmp_path / "cache")
    other_seed.fill()
    assert not torch.equal(other_seed.latents(batch, 0, 1), disk.latents(batch, 0, 1))


def test_file_damaged_during_training_is_encoded_again_not_used(tmp_path, vae_calls, capsys):
    vae = build_builtin("tiny-sd15").vae
    source = LatentSource(small_data(tmp_path), vae, "disk", seed=4, cache_dir=tmp_path / "cache")
    source.fill()
    batch = Batch([], [1], ["c"], [True])
    before = source.latents(batch, 0, 1)
    path = source.files[(1, True)][0]
    path.write_bytes(b"\0" * 100)
    encoded = vae_calls["images"]
    after = source.latents(batch, 0, 1)
    assert vae_calls["images"] == encoded + 1 and torch.equal(before, after)
    assert f"{path} is unreadable" in capsys.readouterr().out
    assert DiskLatentCache(tmp_path / "cache", vae).check(path, source.files[(1, True)][1],
                                                          source.entry((1, True)), full=True) is not None


def test_entry_written_for_other_settings_is_refused(tmp_path):
    vae = build_builtin("tiny-sd15").vae
    cache = DiskLatentCache(tmp_path, vae)
    entry = LatentEntry(tmp_path / "x.png", 64, 64)
    path = cache.file_for("abc", entry)
    cache.write(path, "abc", LatentEntry(tmp_path / "x.png", 64, 64, flip=True), torch.zeros(4, 8, 8),
                torch.ones(4, 8, 8))
    with pytest.raises(ValueError, match=r"other settings \(flip\)"):
        cache.check(path, "abc", entry)


def test_vae_identity_follows_the_encoder_only():
    vae = build_builtin("tiny-sd15").vae
    base = vae_identity(vae)
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(1.0)  # a VAE with a fine-tuned decoder encodes the same latents
        assert vae_identity(vae) == base
        vae.encoder.conv_in.weight.mul_(1.001)
    assert vae_identity(vae) != base


def test_the_encode_precision_is_part_of_the_key_and_fp32_keys_are_unchanged(tmp_path):
    import hashlib
    import json

    from library.data.latent_cache import CACHE_FORMAT

    bf16_vae = torch.nn.Module.to(build_builtin("tiny-sd15").vae, torch.bfloat16)
    fp32_vae = torch.nn.Module.to(build_builtin("tiny-sd15").vae, torch.bfloat16).float()  # bf16-exact weights
    entry = LatentEntry(tmp_path / "x.png", 64, 64)
    fp32, bf16 = DiskLatentCache(tmp_path, fp32_vae), DiskLatentCache(tmp_path, bf16_vae)
    assert bf16.vae_id == fp32.vae_id  # the same VAE: only the precision it encodes in tells the entries apart
    assert bf16.file_for("abc", entry) != fp32.file_for("abc", entry)
    # fp32 entries keep the address they had before precision was part of the key (existing caches stay valid)
    fields = {"format": CACHE_FORMAT, "image_sha256": "abc", "width": "64", "height": "64", "crop": "center",
              "flip": "0", "vae": fp32.vae_id}
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:40]
    assert fp32.file_for("abc", entry).name == f"{key}.safetensors"
    bf16.write(bf16.file_for("abc", entry), "abc", entry, torch.zeros(4, 8, 8), torch.ones(4, 8, 8))
    with pytest.raises(ValueError, match=r"other settings \(encode_dtype\)"):
        fp32.check(bf16.file_for("abc", entry), "abc", entry)


def test_interrupted_prepare_continues_where_it_stopped(tmp_path, vae_calls, monkeypatch, capsys):
    path = bucket_config(tmp_path)
    original = DiskLatentCache.write
    written = {"n": 0}

    def interrupt_third(self, *args):
        written["n"] += 1
        if written["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(DiskLatentCache, "write", interrupt_third)
    assert prepare(path) == 130
    assert "run the same command again to continue" in capsys.readouterr().out
    assert len(cache_files(tmp_path)) == 2
    monkeypatch.setattr(DiskLatentCache, "write", original)
    assert prepare(path) == 0
    assert "2 reused, 4 encoded" in capsys.readouterr().out and len(cache_files(tmp_path)) == 6


def test_prepare_reads_any_trainers_config_but_checks_its_own_sections(tmp_path, capsys):
    path = bucket_config(tmp_path)
    path.write_text(path.read_text() + '\n[embedding]\ntoken = "<thing>"\n', encoding="utf-8")
    assert prepare(path, "--no-cache") == 0
    assert "96x96" in capsys.readouterr().out and not cache_files(tmp_path)
    assert prepare(path, "dataset.enable_bucket=true") == 2
    assert "did you mean 'enable_buckets'" in capsys.readouterr().err


# ------------------------------------------------------------------ text-encoder outputs


def test_text_encoder_cache_is_refused_when_captions_or_encoder_change(tmp_path, capsys):
    path = bucket_config(tmp_path, extra="cache_text_encoder_outputs = true")
    with pytest.raises(ConfigError) as info:
        read_config(path, ["dataset.shuffle_caption=true"], LORA)
    assert "dataset.cache_text_encoder_outputs" in str(info.value) and "dataset.shuffle_caption" in str(info.value)
    with pytest.raises(SystemExit):
        train_lora.main([str(path), "--check"])  # LoRA trains the text encoder by default
    err = capsys.readouterr().err
    assert "dataset.cache_text_encoder_outputs" in err and "network.train_text_encoder" in err
    assert train_lora.main([str(path), "--check", "network.train_text_encoder=false"]) == 0
    with pytest.raises(ValueError, match="trains the text encoder"):
        ConditioningSource(None, cache=True, trains_text_encoder=True)


def test_text_encoder_outputs_are_computed_once_per_caption():
    parts = build_builtin("tiny-sd15")
    encoder = parts.text_encoder
    calls = {"rows": 0}
    forward = encoder.forward

    def counting(input_ids, *args, **kwargs):
        calls["rows"] += input_ids.shape[0]
        return forward(input_ids, *args, **kwargs)

    encoder.forward = counting
    source = ConditioningSource(parts, clip_skip=2, cache=True)
    first = source.encode(["a pot", "a jug", "a pot"]).hidden_states
    second = source.encode(["a jug", "a pot"]).hidden_states
    assert calls["rows"] == 2  # two distinct captions, encoded once
    with torch.no_grad():
        expected = encode_text(encoder, tokenize(parts.tokenizer, ["a jug", "a pot"]), clip_skip=2)
    assert torch.allclose(second, expected, atol=1e-6) and torch.equal(first[0], first[2])


def test_textual_inversion_reuses_the_cache_a_lora_run_wrote(tmp_path, vae_calls, capsys):
    import train_textual_inversion

    path = bucket_config(tmp_path, extra='cache_latents = "disk"')
    assert train_lora.main([str(path)]) == 0
    assert vae_calls["images"] == 6
    ti = tmp_path / "ti.toml"
    text = path.read_text().replace("[network]\nrank = 2\nalpha = 2\n", "")
    text = text.replace('name = "b"', 'name = "pot_ti"')
    ti.write_text(text + '\n[embedding]\nname = "kilnpotti"\nvectors = 1\nlatent_sampling_method = "random"\n'
                  '[ti_log]\ncreate_image_every = 0\nsave_embedding_every = 0\n', encoding="utf-8")
    assert train_textual_inversion.main([str(ti), "train.max_steps=3"]) == 0
    assert vae_calls["images"] == 6  # TI read the LoRA run's latents: not one VAE encode
    assert "6 reused, 0 encoded" in capsys.readouterr().out
