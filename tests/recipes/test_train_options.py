"""The sd-scripts options through the scripts users run, on the tiny model: a run with every option on resumes
bit for bit (EMA included), its file records the options under sd-scripts' ss_* keys, masks reach the loss,
EMA files are written beside the result, and DreamBooth trains with the fused Adafactor pass in bf16."""
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import train_dreambooth
import train_lora
import train_textual_inversion
from tests.helpers import SAMPLES, write_run_config

EVERY_OPTION = """[dataset]
train_dir = "{train}"
resolution = 64
flip_aug = true
cache_latents = "off"
color_aug = true
masked_loss = true
keep_tokens_separator = "|||"
secondary_separator = ";;;"
enable_wildcard = true
[network]
rank = 4
alpha = 2
conv_rank = 2
rank_dropout = 0.2
module_dropout = 0.1
down_lr_weight = "sine"
block_lr_zero_threshold = 0.2
mid_lr_weight = 0.7
up_lr_weight = [1.0, 1.0, 1.0, 0.5]
scale_weight_norms = 1.0
[optimizer]
lr = 2e-3
scheduler = "cosine"
[train]
max_steps = 6
batch_size = 2
gradient_accumulation_steps = 2
seed = 5
mixed_precision = "bf16"
full_bf16 = true
noise_offset = 0.05
noise_offset_random_strength = true
adaptive_noise_scale = 0.01
multires_noise_iterations = 3
multires_noise_discount = 0.4
ip_noise_gamma = 0.05
ip_noise_gamma_random_strength = true
zero_terminal_snr = true
min_timestep = 50
max_timestep = 950
loss_type = "huber"
huber_schedule = "exponential"
huber_c = 0.2
huber_scale = 1.5
min_snr_gamma = 5.0
debiased_estimation_loss = true
v_pred_like_loss = 0.1
[ema]
enabled = true
decay = 0.9
update_interval = 2
save_as = "beside"
"""


def dataset(tmp: Path, mask_value: int | None = None) -> Path:
    """The sample images with masks (left half white, or all `mask_value`) and captions using the options."""
    train = tmp / "train"
    shutil.copytree(SAMPLES, train)
    for index, image in enumerate(sorted(p for p in (train / "10_kiln pot").iterdir() if p.suffix in (".png", ".jpg"))):
        width, height = Image.open(image).size
        values = np.zeros((height, width), dtype=np.uint8)
        values[:, : width // 2] = 255
        if mask_value is not None:
            values[:] = mask_value
        Image.fromarray(values).save(image.with_name(image.stem + ".mask.png"))
        image.with_suffix(".txt").write_text(f"kiln pot ||| {{red|brown|blue}} glaze, studio;;;light, item {index}",
                                             encoding="utf-8")
    return train


def run_lora(config: Path, *overrides: str) -> int:
    return train_lora.main([str(config), *overrides])


def test_a_run_with_every_option_resumes_exactly_and_records_the_options(tmp_path):
    dataset(tmp_path)
    config = write_run_config(tmp_path, EVERY_OPTION)
    out = tmp_path / "out"
    assert run_lora(config, "save.every_n_steps=3", "save.save_state=true", "save.precision=fp32") == 0
    state = out / "t-step00000003-state"
    assert (state / "ema.safetensors").is_file() and (out / "t-step00000003-ema.safetensors").is_file()
    resumed = tmp_path / "resumed"
    assert run_lora(config, f"save.resume={state.as_posix()}", f"save.output_dir={resumed.as_posix()}",
                    "save.precision=fp32") == 0
    for name in ("t.safetensors", "t-ema.safetensors"):
        reference, again = load_file(str(out / name)), load_file(str(resumed / name))
        assert reference.keys() == again.keys()
        assert all(torch.equal(reference[k], again[k]) for k in reference), name
    live, ema = load_file(str(out / "t.safetensors")), load_file(str(out / "t-ema.safetensors"))
    assert any(not torch.equal(live[k], ema[k]) for k in live if k.endswith("lora_up.weight"))
    assert not any(k.startswith("lora_unet_down_blocks_0_attentions_0") for k in live)  # IN01: sine 0.14 < 0.2

    with safe_open(str(out / "t.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_multires_noise_iterations"] == "3" and meta["ss_multires_noise_discount"] == "0.4"
    assert meta["ss_ip_noise_gamma"] == "0.05" and meta["ss_ip_noise_gamma_random_strength"] == "True"
    assert meta["ss_noise_offset_random_strength"] == "True" and meta["ss_adaptive_noise_scale"] == "0.01"
    assert meta["ss_zero_terminal_snr"] == "True" and meta["ss_debiased_estimation"] == "True"
    assert meta["ss_loss_type"] == "huber" and meta["ss_huber_schedule"] == "exponential"
    assert meta["ss_huber_c"] == "0.2" and meta["ss_huber_scale"] == "1.5"
    assert meta["ss_scale_weight_norms"] == "1.0" and meta["ss_color_aug"] == "True"
    assert meta["modelspec.timestep_range"] == "50,950"
    args = json.loads(meta["ss_network_args"])
    assert args["rank_dropout"] == "0.2" and args["down_lr_weight"] == "sine" and args["mid_lr_weight"] == "0.7"
    subset = json.loads(meta["ss_datasets"])[0]["subsets"][0]
    assert subset["keep_tokens_separator"] == "|||" and subset["enable_wildcard"] is True

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"max_norm/keys_scaled", "max_norm/average_key_norm", "max_norm/max_key_norm", "lr/unet_IN04",
            "lr/unet_MID", "lr/text_encoder"} <= tags
    assert accumulator.Scalars("lr/unet_MID")[0].value < accumulator.Scalars("lr/text_encoder")[0].value * 4 + 1


def test_fully_masked_images_teach_nothing(tmp_path):
    dataset(tmp_path, mask_value=0)
    config = write_run_config(tmp_path, '[dataset]\ntrain_dir = "{train}"\nresolution = 64\nmasked_loss = true\n'
                                         '[network]\nrank = 2\nalpha = 2\n[train]\nmax_steps = 2\nbatch_size = 2\n')
    assert run_lora(config) == 0
    weights = load_file(str(tmp_path / "out" / "t.safetensors"))
    ups = [v for k, v in weights.items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.count_nonzero(v) == 0 for v in ups)  # zero loss, zero gradient: lora_up stays 0
    summary = json.loads((tmp_path / "out" / "t.run.json").read_text())
    assert summary["final_loss"] == 0.0


def test_textual_inversion_keeps_an_ema_beside_and_trains_with_alpha_masks(tmp_path, capsys):
    train = tmp_path / "train"
    shutil.copytree(SAMPLES, train)
    first = sorted((train / "10_kiln pot").glob("*.png"))[0]
    rgba = Image.open(first).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0))  # a fully transparent image: it teaches nothing
    rgba.save(first)
    config = write_run_config(tmp_path, '[dataset]\ntrain_dir = "{train}"\nresolution = 64\nalpha_mask = true\n'
                                         '[embedding]\nname = "kilnema"\ninit_text = "pot"\nformat = "safetensors"\n'
                                         '[ti_log]\nsave_embedding_every = 0\ncreate_image_every = 0\n'
                                         'write_csv_every = 0\n[ema]\nenabled = true\ndecay = 0.5\n'
                                         'update_interval = 1\nsave_as = "beside"\n[train]\nmax_steps = 3\n'
                                         'batch_size = 2\n[save]\noutput_dir = "{tmp}/out"\nname = "kilnema"\n'
                                         'precision = "fp32"\n', train)
    assert train_textual_inversion.main([str(config)]) == 0
    assert "loss masks: 6 of 6 images have one" in capsys.readouterr().out
    live = load_file(str(tmp_path / "out" / "kilnema.safetensors"))["emb_params"]
    ema = load_file(str(tmp_path / "out" / "kilnema-ema.safetensors"))["emb_params"]
    assert live.shape == ema.shape and not torch.equal(live, ema)


def test_dreambooth_fused_adafactor_in_bf16_with_ema_resumes_exactly(tmp_path):
    train = tmp_path / "train"
    shutil.copytree(SAMPLES, train)
    body = """[optimizer]
name = "Adafactor"
lr = 1e-4
fused_backward_pass = true
[train]
max_steps = 4
batch_size = 2
seed = 3
mixed_precision = "bf16"
full_bf16 = true
[ema]
enabled = true
device = "cpu"
update_interval = 1
[save]
output_dir = "{tmp}/out"
name = "db"
precision = "fp32"
"""
    config = write_run_config(tmp_path, body, train)
    assert train_dreambooth.main([str(config), "save.every_n_steps=2", "save.save_state=true"]) == 0
    state = tmp_path / "out" / "db-step00000002-state"
    assert (state / "ema.safetensors").is_file()
    assert train_dreambooth.main([str(config), f"save.resume={state.as_posix()}",
                                  f"save.output_dir={(tmp_path / 'b').as_posix()}"]) == 0
    reference, again = load_file(str(tmp_path / "out" / "db.safetensors")), load_file(str(tmp_path / "b" / "db.safetensors"))
    assert all(torch.equal(reference[k], again[k]) for k in reference)
