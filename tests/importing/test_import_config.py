"""tools/import_config.py on realistic configs of both kinds (written from sd-scripts' and kohya_ss' docs, with
the options their users set most): every option lands on its Kiln key or is listed with a reason, the result
validates and --check accepts it, nothing is overwritten, and README's mapping table is the generated one."""
import json
import shutil
import tomllib
from pathlib import Path

import pytest

import train_lora
from library.importing.convert import mapping_table
from library.importing.sources import gui_table
from library.importing.tool import main

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "examples" / "sample_dataset"

CONFIG_FILE = """
[model_arguments]
v2 = false
v_parameterization = false
pretrained_model_name_or_path = "/models/v1-5-pruned-emaonly.safetensors"

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 32
network_alpha = 16
network_args = ["conv_dim=8", "conv_alpha=4", "rank_dropout=0.1"]
unet_lr = 1e-4
text_encoder_lr = 5e-5
network_train_unet_only = false

[optimizer_arguments]
optimizer_type = "AdamW8bit"
learning_rate = 1e-4
optimizer_args = ["weight_decay=0.01", "betas=0.9,0.99"]
max_grad_norm = 1.0
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 3
lr_warmup_steps = 0.05

[dataset_arguments]
dataset_config = "dataset.toml"
cache_latents = true
cache_latents_to_disk = true
max_token_length = 225

[training_arguments]
output_dir = "/train/mychar/output"
output_name = "mychar_v1"
save_model_as = "safetensors"
save_precision = "fp16"
save_every_n_epochs = 1
max_train_epochs = 10
train_batch_size = 1
mixed_precision = "fp16"
xformers = true
gradient_checkpointing = true
clip_skip = 2
seed = 42
noise_offset = 0.05
min_snr_gamma = 5.0
prior_loss_weight = 1.0
logging_dir = "/train/mychar/logs"
log_with = "tensorboard"

[sample_prompt_arguments]
sample_prompts = "/train/mychar/prompts.txt"
sample_every_n_epochs = 1
sample_sampler = "euler_a"
"""

DATASET_CONFIG = """
[general]
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 64
bucket_no_upscale = false
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"
flip_aug = false
color_aug = false
caption_dropout_rate = 0.0

[[datasets]]
resolution = 512
batch_size = 2

  [[datasets.subsets]]
  image_dir = "/train/mychar/img/10_sks person"
  num_repeats = 10
  class_tokens = "sks person"

  [[datasets.subsets]]
  image_dir = "/train/mychar/extra"
  num_repeats = 3
  caption_prefix = "sks person,"
  keep_tokens_separator = "|||"
  alpha_mask = true

  [[datasets.subsets]]
  is_reg = true
  image_dir = "/train/reg/person"
  class_tokens = "person"
  num_repeats = 1
"""

GUI_CONFIG = {
    "LoRA_type": "Standard", "LyCORIS_preset": "full",
    "pretrained_model_name_or_path": "/models/v1-5-pruned-emaonly.safetensors", "model_list": "custom",
    "v2": False, "v_parameterization": False, "sdxl": False,
    "train_data_dir": "/train/mychar/img", "reg_data_dir": "", "dataset_config": "",
    "output_dir": "/train/mychar/model", "output_name": "mychar_v1", "logging_dir": "/train/mychar/log",
    "max_resolution": "512,512", "enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 2048,
    "bucket_reso_steps": 64.0, "bucket_no_upscale": True,
    "network_dim": 32, "network_alpha": 16.0, "conv_dim": 1, "conv_alpha": 1,
    "network_dropout": 0, "rank_dropout": 0, "module_dropout": 0, "down_lr_weight": "", "mid_lr_weight": "",
    "up_lr_weight": "", "block_lr_zero_threshold": "", "block_dims": "", "block_alphas": "",
    "conv_block_dims": "", "conv_block_alphas": "",
    "optimizer": "AdamW8bit", "optimizer_args": "weight_decay=0.01 betas=0.9,0.99",
    "learning_rate": 0.0001, "unet_lr": 0.0001, "text_encoder_lr": "5e-05",
    "lr_scheduler": "cosine_with_restarts", "lr_scheduler_args": "", "lr_scheduler_type": "",
    "lr_warmup": 5, "lr_scheduler_num_cycles": "3", "lr_scheduler_power": "",
    "train_batch_size": 2, "epoch": 10, "max_train_epochs": "", "max_train_steps": "",
    "gradient_accumulation_steps": 1, "max_grad_norm": 1,
    "save_every_n_epochs": 1, "save_every_n_steps": 0, "save_last_n_steps": 0, "save_last_n_steps_state": 0,
    "save_model_as": "safetensors", "save_precision": "fp16", "mixed_precision": "fp16", "save_state": False,
    "resume": "", "seed": "1234", "clip_skip": 2,
    "caption_extension": ".txt", "shuffle_caption": True, "keep_tokens": "1",
    "caption_dropout_rate": 0.05, "caption_dropout_every_n_epochs": 0,
    "flip_aug": False, "color_aug": False, "random_crop": False,
    "cache_latents": True, "cache_latents_to_disk": False,
    "gradient_checkpointing": True, "mem_eff_attn": False, "xformers": "xformers",
    "max_token_length": "225", "max_data_loader_n_workers": "0", "persistent_data_loader_workers": False,
    "noise_offset_type": "Multires", "noise_offset": 0, "adaptive_noise_scale": 0,
    "multires_noise_iterations": 6, "multires_noise_discount": 0.3,
    "ip_noise_gamma": 0, "min_snr_gamma": 5, "debiased_estimation_loss": False,
    "scale_v_pred_loss_like_noise_pred": False, "v_pred_like_loss": 0,
    "loss_type": "l2", "huber_schedule": "snr", "huber_c": 0.1,
    "min_timestep": 0, "max_timestep": 1000, "scale_weight_norms": 0, "prior_loss_weight": 1.0,
    "full_fp16": False, "full_bf16": False, "fp8_base": False, "masked_loss": False,
    "sample_prompts": "sks person, portrait, smiling --n lowres, bad anatomy --w 512 --h 512 --l 7 --s 28 --d 42",
    "sample_every_n_steps": 0, "sample_every_n_epochs": 1, "sample_sampler": "euler_a",
    "vae": "", "vae_batch_size": 0, "weighted_captions": False, "dim_from_weights": False, "network_weights": "",
    "training_comment": "trigger: sks person", "additional_parameters": "",
    "stop_text_encoder_training": 0, "num_cpu_threads_per_process": 2,
}


def import_to(tmp: Path, source: Path, *args: str) -> tuple[dict, str, str]:
    out = tmp / "kiln.toml"
    assert main([str(source), "-o", str(out), *args]) == 0
    text = out.read_text(encoding="utf-8")
    return tomllib.loads(text), text, out.as_posix()


def not_imported(text: str) -> dict[str, str]:
    """{option: reason} from the written file's header."""
    lines = text.split("# Not imported", 1)[1].splitlines()[1:]
    listed = [line[4:] for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("#   "))]]
    return {line.split(" = ", 1)[0]: line.split(": ", 1)[1] for line in listed}


def test_sd_scripts_config_and_dataset_config(tmp_path, capsys):
    (tmp_path / "config.toml").write_text(CONFIG_FILE, encoding="utf-8")
    (tmp_path / "dataset.toml").write_text(DATASET_CONFIG, encoding="utf-8")  # found beside the config
    data, text, _ = import_to(tmp_path, tmp_path / "config.toml")
    assert data["trainer"] == "lora"
    assert data["model"] == {"path": "/models/v1-5-pruned-emaonly.safetensors", "clip_skip": 2}
    assert data["network"] == {"type": "lora", "rank": 32, "alpha": 16.0, "conv_rank": 8, "conv_alpha": 4.0,
                               "rank_dropout": 0.1, "unet_lr": 1e-4, "text_encoder_lr": 5e-5}
    assert data["optimizer"] == {"name": "AdamW8bit", "lr": 1e-4, "args": {"weight_decay": 0.01, "betas": [0.9, 0.99]},
                                 "max_grad_norm": 1.0, "scheduler": "cosine_with_restarts", "num_cycles": 3,
                                 "warmup_ratio": 0.05}
    assert data["train"] == {"epochs": 10, "batch_size": 2, "mixed_precision": "fp16", "gradient_checkpointing": True,
                             "seed": 42, "noise_offset": 0.05, "min_snr_gamma": 5.0, "attention": "xformers"}
    dataset = data["dataset"]
    assert (dataset["resolution"], dataset["enable_buckets"], dataset["min_bucket_reso"], dataset["max_bucket_reso"],
            dataset["bucket_reso_steps"]) == (512, True, 256, 1024, 64)
    assert (dataset["shuffle_caption"], dataset["keep_tokens"], dataset["caption_extension"],
            dataset["cache_latents"], dataset["keep_tokens_separator"]) == (True, 1, ".txt", "disk", "|||")
    assert dataset["subsets"] == [
        {"image_dir": "/train/mychar/img/10_sks person", "repeats": 10, "class_tokens": "sks person"},
        {"image_dir": "/train/mychar/extra", "repeats": 3, "caption_prefix": "sks person,", "alpha_mask": True},
        {"image_dir": "/train/reg/person", "repeats": 1, "class_tokens": "person", "is_reg": True}]
    assert data["save"] == {"output_dir": "/train/mychar/output", "name": "mychar_v1", "precision": "fp16",
                            "every_n_epochs": 1}
    assert data["logging"] == {"log_dir": "/train/mychar/logs"}
    assert data["sample"] == {"prompt_file": "/train/mychar/prompts.txt", "every_n_epochs": 1, "sampler": "euler_a"}
    skipped = not_imported(text)
    assert set(skipped) == {"max_token_length", "log_with"}
    assert skipped["max_token_length"] == "not implemented in Kiln"
    out = capsys.readouterr().out
    assert "not imported (2)" in out and "does not validate" not in out  # the schema accepts the result


def test_kohya_gui_json(tmp_path, capsys):
    source = tmp_path / "gui.json"
    source.write_text(json.dumps(GUI_CONFIG, indent=2), encoding="utf-8")
    data, text, out = import_to(tmp_path, source)
    assert data["trainer"] == "lora"
    assert data["network"] == {"type": "lora", "rank": 32, "alpha": 16.0, "unet_lr": 1e-4, "text_encoder_lr": 5e-5}
    assert data["optimizer"] == {"name": "AdamW8bit", "args": {"weight_decay": 0.01, "betas": [0.9, 0.99]},
                                 "lr": 1e-4, "scheduler": "cosine_with_restarts", "warmup_ratio": 0.05,
                                 "num_cycles": 3, "max_grad_norm": 1.0}
    assert data["train"] == {"batch_size": 2, "epochs": 10, "gradient_accumulation_steps": 1, "mixed_precision": "fp16",
                             "seed": 1234, "gradient_checkpointing": True, "attention": "xformers",
                             "multires_noise_iterations": 6, "min_snr_gamma": 5.0}
    assert data["dataset"] == {"train_dir": "/train/mychar/img", "resolution": 512, "enable_buckets": True,
                               "min_bucket_reso": 256, "max_bucket_reso": 2048, "bucket_reso_steps": 64,
                               "bucket_no_upscale": True, "caption_extension": ".txt", "shuffle_caption": True,
                               "keep_tokens": 1, "caption_dropout_rate": 0.05, "cache_latents": "memory"}
    assert data["model"] == {"path": "/models/v1-5-pruned-emaonly.safetensors", "clip_skip": 2}
    assert data["sample"] == {"prompts": [GUI_CONFIG["sample_prompts"]], "every_n_epochs": 1, "sampler": "euler_a"}
    assert data["save"] == {"output_dir": "/train/mychar/model", "name": "mychar_v1", "every_n_epochs": 1,
                            "precision": "fp16"}
    skipped = not_imported(text)
    assert set(skipped) == {"max_token_length", "training_comment", "num_cpu_threads_per_process", "model_list"}
    assert "Kiln sets" not in text and "network.factor" not in text
    assert "does not validate" not in capsys.readouterr().out
    # what a user does next: --check it on their machine (here: the tiny model and the sample images)
    train = tmp_path / "img"
    shutil.copytree(SAMPLES / "train", train)
    assert train_lora.main([out, "--check", "model.path=builtin:tiny-sd15", f"dataset.train_dir={train.as_posix()}",
                            "dataset.resolution=64", "dataset.min_bucket_reso=64", "dataset.max_bucket_reso=128",
                            "optimizer.name=AdamW", "train.attention=auto", "train.mixed_precision=no"]) == 0
    assert "10 epochs" in capsys.readouterr().out


def test_lycoris_types_map_to_network_kinds(tmp_path, capsys):
    lokr = {**GUI_CONFIG, "LoRA_type": "LyCORIS/LoKr", "conv_dim": 8, "conv_alpha": 4, "factor": 8,
            "use_tucker": True, "rank_dropout": 0.1}
    (tmp_path / "lokr.json").write_text(json.dumps(lokr), encoding="utf-8")
    data, text, _ = import_to(tmp_path, tmp_path / "lokr.json")
    assert (data["network"]["type"], data["network"]["conv_rank"], data["network"]["factor"]) == ("lokr", 8, 8)
    skipped = not_imported(text)
    assert {"network_args use_tucker", "network_args rank_dropout", "LyCORIS_preset"} <= set(skipped)
    ia3 = {**GUI_CONFIG, "LoRA_type": "LyCORIS/iA3"}
    (tmp_path / "ia3.json").write_text(json.dumps(ia3), encoding="utf-8")
    data, text, _ = import_to(tmp_path, tmp_path / "ia3.json", "--overwrite")
    assert "type" not in data.get("network", {}) and "no Kiln network kind" in not_imported(text)["LoRA_type"]


def test_never_overwrites_and_reports_bad_input(tmp_path, capsys):
    source = tmp_path / "gui.json"
    source.write_text(json.dumps(GUI_CONFIG), encoding="utf-8")
    out = tmp_path / "gui.kiln.toml"
    out.write_text("mine", encoding="utf-8")
    assert main([str(source)]) == 2
    assert out.read_text(encoding="utf-8") == "mine" and "--overwrite" in capsys.readouterr().out
    assert main([str(source), "--overwrite"]) == 0 and out.read_text(encoding="utf-8").startswith("# Kiln config")
    (tmp_path / "bad.toml").write_text("dataset_config = 'nowhere.toml'\n", encoding="utf-8")
    assert main([str(tmp_path / "bad.toml")]) == 2
    assert "dataset config not found: nowhere.toml" in capsys.readouterr().out


@pytest.mark.parametrize("trainer_options, trainer, expected", [
    ({"token_string": "kilnpot", "init_word": "pot", "num_vectors_per_token": 2, "use_object_template": True,
      "save_model_as": "safetensors"}, "textual_inversion",
     {"embedding": {"name": "kilnpot", "init_text": "pot", "vectors": 2, "template": "subject",
                    "format": "safetensors"}}),
    ({"learning_rate_te": 1e-6, "stop_text_encoder_training": 400, "save_model_as": "diffusers"}, "dreambooth",
     {"dreambooth": {"text_encoder_lr": 1e-6, "train_text_encoder": True, "stop_text_encoder_training": 400,
                     "save_format": "diffusers"}}),
])
def test_textual_inversion_and_dreambooth_configs(tmp_path, trainer_options, trainer, expected):
    lines = [f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}"
             for key, value in trainer_options.items()]
    (tmp_path / "c.toml").write_text('pretrained_model_name_or_path = "/m.safetensors"\ntrain_data_dir = "/d"\n'
                                     "max_train_steps = 800\n" + "\n".join(lines) + "\n", encoding="utf-8")
    data, _, _ = import_to(tmp_path, tmp_path / "c.toml")
    assert data["trainer"] == trainer
    for section, values in expected.items():
        assert {k: data[section][k] for k in values} == values


def test_readme_mapping_tables_are_the_generated_ones():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- import-mapping:start -->\n", "<!-- import-mapping:end -->"
    assert start in readme and end in readme, "README lacks the generated mapping table markers"
    block = readme.split(start, 1)[1].split(end, 1)[0]
    assert block == mapping_table() + "\n" + gui_table(), \
        "README's mapping tables are stale: regenerate with python tools/import_config.py --mapping-table"


def test_the_training_options_carry_over(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("""pretrained_model_name_or_path = "/m.safetensors"
network_module = "networks.lora"
network_dim = 8
network_args = ["conv_dim=4", "down_lr_weight=sine+0.5", "mid_lr_weight=0.5", "block_dims=4,4,4", "rank_dropout=0.1",
                "module_dropout=0.05"]
scale_weight_norms = 1.0
max_train_steps = 100
multires_noise_iterations = 6
multires_noise_discount = 0.1
ip_noise_gamma = 0.1
zero_terminal_snr = true
min_timestep = 100
loss_type = "smooth_l1"
huber_schedule = "exponential"
huber_c = 0.2
huber_scale = 2.0
debiased_estimation_loss = true
adaptive_noise_scale = 0.01
masked_loss = true
full_bf16 = true
mixed_precision = "bf16"
dataset_config = "d.toml"
""", encoding="utf-8")
    (tmp_path / "d.toml").write_text("""[general]
color_aug = true
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "/img"
  conditioning_data_dir = "/masks"
  enable_wildcard = true
  secondary_separator = ";;;"
""", encoding="utf-8")
    data, text, _ = import_to(tmp_path, tmp_path / "c.toml")
    network, train, dataset = data["network"], data["train"], data["dataset"]
    assert (network["down_lr_weight"], network["mid_lr_weight"], network["block_dims"]) == ("sine+0.5", "0.5", "4,4,4")
    assert (network["rank_dropout"], network["module_dropout"], network["scale_weight_norms"]) == (0.1, 0.05, 1.0)
    assert train["multires_noise_iterations"] == 6 and train["multires_noise_discount"] == 0.1
    assert train["loss_type"] == "smooth_l1" and train["huber_c"] == 0.2 and train["huber_scale"] == 2.0
    assert train["zero_terminal_snr"] is True and train["min_timestep"] == 100 and train["full_bf16"] is True
    assert "adaptive_noise_scale" not in train  # without noise_offset it does nothing: listed, not imported
    assert "adaptive_noise_scale" in not_imported(text)
    assert dataset["color_aug"] is True and dataset["cache_latents"] == "off" and dataset["enable_wildcard"] is True
    assert dataset["subsets"] == [{"image_dir": "/img", "mask_dir": "/masks", "masked_loss": True}]
    assert dataset["secondary_separator"] == ";;;" and dataset["masked_loss"] is True
    assert "does not validate" not in capsys.readouterr().out
