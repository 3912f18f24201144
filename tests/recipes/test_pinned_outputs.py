"""Fixed-seed runs of every trainer write the same tensors, release after release.

Each case trains a few steps on the built-in tiny model and compares the saved tensors with numbers pinned
in tests/fixtures/pinned_outputs.json. Two levels:
- always: per-tensor L2 norm, absolute sum and a projection on a fixed random direction, to a relative
  tolerance of 1e-4 (a changed seed, data order, loss or default moves them by far more; a CPU whose
  kernels round differently does not);
- with KILN_PIN_EXACT=1 (the machine the pins were written on): the SHA-256 of the raw bytes, bit for bit.
KILN_PIN_WRITE=1 rewrites the pins; do that only for an intended change of behaviour, and say so.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_dreambooth
import train_lora
import train_textual_inversion

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "examples" / "sample_dataset" / "train"
PINS = REPO / "tests" / "fixtures" / "pinned_outputs.json"
RELATIVE_TOLERANCE = 1e-4

COMMON = """
[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{train}"
resolution = 64
{dataset}
[train]
max_steps = 6
batch_size = 2
seed = 11
num_threads = 1
[save]
output_dir = "{out}"
name = "pin"
precision = "fp32"
[logging]
log_dir = "{logs}"
"""

CASES = {
    "lora_memory": ("lora", 'flip_aug = true\nshuffle_caption = true\nkeep_tokens = 1\ncache_latents = "memory"',
                    '[network]\nrank = 4\nalpha = 2\nunet_lr = 1e-3\ntext_encoder_lr = 5e-4\n'
                    '[optimizer]\nscheduler = "cosine"\nwarmup_ratio = 0.2'),
    "lora_off_locon": ("lora", 'cache_latents = "off"\nrandom_crop = true',
                       '[network]\nrank = 4\nalpha = 4\nconv_rank = 2\nconv_alpha = 1\ntrain_text_encoder = false'),
    "lora_disk_buckets": ("lora", 'cache_latents = "disk"\nenable_buckets = true\nmin_bucket_reso = 32\n'
                          'max_bucket_reso = 128\nbucket_reso_steps = 32',
                          '[network]\nrank = 2\nalpha = 1\n[train]\ngradient_accumulation_steps = 2'),
    "ti_once": ("ti", 'flip_aug = true\ncache_latents = "memory"',
                '[embedding]\nname = "kilnpin"\ninit_text = "pot"\nvectors = 2\nlearn_rate = "0.05:3, 0.02"\n'
                'latent_sampling_method = "once"\nformat = "safetensors"\n[ti_log]\nsave_embedding_every = 0\n'
                'create_image_every = 0\nwrite_csv_every = 0'),
    "ti_deterministic_disk": ("ti", 'cache_latents = "disk"',
                              '[embedding]\nname = "kilnpin"\ninit_text = "pot"\nshuffle_tags = true\n'
                              'latent_sampling_method = "deterministic"\nformat = "safetensors"\n[ti_log]\n'
                              'save_embedding_every = 0\ncreate_image_every = 0\nwrite_csv_every = 0'),
    "ti_random_off": ("ti", 'cache_latents = "off"',
                      '[embedding]\nname = "kilnpin"\ninit_text = "pot"\ntag_dropout = 0.3\n'
                      'latent_sampling_method = "random"\nformat = "safetensors"\n[ti_log]\n'
                      'save_embedding_every = 0\ncreate_image_every = 0\nwrite_csv_every = 0'),
    "dreambooth": ("dreambooth", 'cache_latents = "memory"',
                   '[dreambooth]\ntrain_text_encoder = true\nstop_text_encoder_training = 3\nunet_lr = 5e-4\n'
                   'text_encoder_lr = 1e-4\nclass_dir = "{tmp}/class/1_pot"\nclass_prompt = "a photo of a pot"\n'
                   'num_class_images = 2\nclass_sampling_steps = 2'),
}
SCRIPTS = {"lora": train_lora, "ti": train_textual_inversion, "dreambooth": train_dreambooth}


def _write_config(tmp: Path, dataset: str, extra: str) -> Path:
    train = tmp / "train"
    shutil.copytree(SAMPLES, train)
    text = COMMON.format(train=train.as_posix(), dataset=dataset, out=(tmp / "out").as_posix(),
                         logs=(tmp / "logs").as_posix())
    extra = extra.replace("{tmp}", tmp.as_posix())
    if "[train]" in extra:  # merge the case's train keys into the common [train] table
        head, train_keys = extra.split("[train]\n", 1)
        text = text.replace("[train]\n", "[train]\n" + train_keys + "\n", 1)
        extra = head
    if "[save]" in extra:
        raise AssertionError("cases must not redefine [save]")
    path = tmp / "run.toml"
    path.write_text(text + extra + "\n", encoding="utf-8")
    return path


def _artifact(tmp: Path, kind: str) -> Path:
    out = tmp / "out"
    return {"lora": out / "pin.safetensors", "ti": out / "pin.safetensors",
            "dreambooth": out / "pin.safetensors"}[kind]


def tensor_stats(tensors: dict[str, torch.Tensor]) -> dict:
    """Per-tensor numbers that move with any real change of training but not with kernel rounding."""
    stats = {}
    for key in sorted(tensors):
        value = tensors[key].detach().double().flatten()
        direction = torch.randn(value.numel(), generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
        stats[key] = [value.norm().item(), value.abs().sum().item(), (value @ direction).item()]
    return stats


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("case", sorted(CASES))
def test_fixed_seed_run_writes_the_pinned_tensors(tmp_path, case):
    kind, dataset, extra = CASES[case]
    config = _write_config(tmp_path, dataset, extra)
    assert SCRIPTS[kind].main([str(config)]) == 0
    tensors = load_file(str(_artifact(tmp_path, kind)))
    found = {"stats": tensor_stats(tensors), "sha256": tensor_digest(tensors)}

    pins = json.loads(PINS.read_text(encoding="utf-8")) if PINS.is_file() else {}
    if os.environ.get("KILN_PIN_WRITE") == "1":
        pins[case] = found
        PINS.parent.mkdir(parents=True, exist_ok=True)
        PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return
    assert case in pins, f"no pin for {case}: run once with KILN_PIN_WRITE=1"
    pinned = pins[case]
    assert sorted(found["stats"]) == sorted(pinned["stats"]), "the saved tensors have other names"
    for key, numbers in pinned["stats"].items():
        scale = max(numbers[0], 1e-12)  # the tensor's L2 norm bounds every other number's size
        for got, want in zip(found["stats"][key], numbers):
            assert abs(got - want) <= RELATIVE_TOLERANCE * scale, (case, key, got, want)
    if os.environ.get("KILN_PIN_EXACT") == "1":
        assert found["sha256"] == pinned["sha256"], f"{case}: tensors differ in their bits"
