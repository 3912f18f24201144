"""train_textual_inversion.py on the tiny models: only the new rows change, the embedding lowers the loss, the
A1111 log layout and CSV, resume from an embedding + .optim mid-schedule, SD 2.x width; prompts, alpha loss
weights and latent sampling methods."""
import csv
import datetime
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

import train_textual_inversion
from tests.helpers import training_set_loss
from library.models.clip_tokenizer import build_clip_tokenizer
from library.models.families.sd import SD2
from library.config.loading import ConfigError, config_to_toml
from library.recipes.textual_inversion import TIRunConfig
from library.data.captions import CaptionOptions
from library.data.folders import ImageItem
from library.training.loss import per_sample_loss
from library.networks.embeddings import add_tokens, init_vectors, load_embedding, read_png_embedding
from library.networks.embedding_names import expand_name
from library.data.latent_cache import encode_distribution
from library.models.paths import CONFIG_ROOT
from library.models.parts import ModelParts
from library.models.builtin import build_builtin
from library.data.prompts import PromptedData, builtin_templates, filename_words, template_lines
from library.data.sources import LatentSource
from library.training.loss import pixel_weighted_loss
from library.data.batches import TrainingData
from library.recipes.textual_inversion import RECIPE as TEXTUAL_INVERSION
from library.recipes.run import read_config

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "examples" / "sample_dataset" / "train"
TODAY = datetime.date.today().isoformat()


def config_text(tmp: Path, **sections: str) -> Path:
    dataset = tmp / "train"
    if not dataset.exists():
        shutil.copytree(SAMPLES, dataset)
    text = f"""
[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{dataset.as_posix()}"
resolution = 64
[embedding]
name = "kilnpot"
init_text = "pot"
vectors = 2
template = "[name], [filewords]"
learn_rate = "0.02:10, 0.01"
latent_sampling_method = "deterministic"
[train]
max_steps = 30
batch_size = 3
seed = 7
[save]
output_dir = "{(tmp / 'out').as_posix()}"
[logging]
log_dir = "{(tmp / 'logs').as_posix()}"
[ti_log]
save_embedding_every = 15
create_image_every = 15
preview_steps = 2
write_csv_every = 1
"""
    path = tmp / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def run(path: Path, *overrides: str) -> int:
    return train_textual_inversion.main([str(path), *overrides])


def use_parts(monkeypatch, parts: ModelParts) -> None:
    monkeypatch.setattr("library.models.loading.load_model", lambda *args, **kwargs: parts)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def denoising_loss_with(vectors: torch.Tensor, init_text: str = "pot") -> float:
    """Training-set loss (fixed timesteps and noise) with `vectors` in the embedding's rows of a fresh model."""
    parts = build_builtin("tiny-sd15")
    ids = add_tokens(parts.tokenizer, parts.text_encoder, "kilnpot", vectors.shape[0])
    with torch.no_grad():
        parts.text_encoder.get_input_embeddings().weight[ids] = vectors
    return training_set_loss(parts, SAMPLES, lambda caption: expand_name(f"kilnpot, {caption}", "kilnpot", 2),
                             latent_mean=True)


def test_only_new_rows_change_the_loss_drops_and_the_a1111_layout_is_written(tmp_path, monkeypatch):
    parts = build_builtin("tiny-sd15")
    unet, vae, text = snapshot(parts.unet), snapshot(parts.vae), snapshot(parts.text_encoder)
    use_parts(monkeypatch, parts)
    assert run(config_text(tmp_path)) == 0

    final = load_embedding(tmp_path / "out" / "kilnpot.pt")
    assert final.name == "kilnpot" and final.step == 30 and final.vectors.shape == (2, 32)
    # every UNet/VAE weight and every other text-encoder value is bitwise unchanged; the new rows hold the result
    for before, module in ((unet, parts.unet), (vae, parts.vae)):
        now = module.state_dict()
        assert before.keys() == now.keys() and all(torch.equal(v, now[k]) for k, v in before.items())
    after = snapshot(parts.text_encoder)
    key = next(k for k, v in after.items() if v.shape == (49410, 32))  # the token table, by shape not by path
    assert all(torch.equal(v, after[k]) for k, v in text.items() if k != key)
    assert torch.equal(after[key][:49408], text[key]) and torch.equal(after[key][49408:], final.vectors)

    initial, _ = init_vectors(build_clip_tokenizer(), build_builtin("tiny-sd15").text_encoder, "pot", 2)
    before_loss, after_loss = denoising_loss_with(initial), denoising_loss_with(final.vectors)
    assert after_loss < before_loss * 0.997, (before_loss, after_loss)

    folder = tmp_path / "logs" / TODAY / "kilnpot"
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    settings = [name for name in names if name.startswith("settings-") and name.endswith(".json")]
    assert len(settings) == 1  # A1111's settings at start
    names.remove(settings[0])
    assert names == ["embeddings/kilnpot-15.pt", "embeddings/kilnpot-15.pt.optim", "embeddings/kilnpot-30.pt",
                     "embeddings/kilnpot-30.pt.optim", "image_embeddings/kilnpot-15.png",
                     "image_embeddings/kilnpot-30.png", "images/kilnpot-15.png", "images/kilnpot-30.png",
                     "textual_inversion_loss.csv"]
    copy = torch.load(folder / "embeddings" / "kilnpot-15.pt", weights_only=True)
    assert copy["name"] == "kilnpot-15" and copy["step"] == 15  # the number of optimizer steps done
    in_png = read_png_embedding(folder / "image_embeddings" / "kilnpot-30.png")
    assert torch.equal(in_png["string_to_param"]["*"], final.vectors)
    with Image.open(folder / "images" / "kilnpot-15.png") as preview:
        assert preview.size == (64, 64) and "kilnpot kilnpot_1, " in preview.text["parameters"]
        assert np.asarray(preview).std() > 0  # a sampled image, not a blank
    rows = read_csv(folder / "textual_inversion_loss.csv")
    assert list(rows[0]) == ["step", "epoch", "epoch_step", "loss", "learn_rate"]
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert [float(r["learn_rate"]) for r in rows] == [0.02] * 10 + [0.01] * 20
    assert (rows[20]["epoch"], rows[20]["epoch_step"]) == ("1", "1")  # 20 steps per epoch; epoch_step counts from 1
    assert all(len(r["loss"].split(".")[1]) == 7 for r in rows)


def test_resume_from_an_embedding_continues_the_schedule_and_refuses_foreign_state(tmp_path, capsys):
    args = ("train.max_steps=6", "embedding.learn_rate=0.05:2, 0.02:4, 0.01", "ti_log.save_embedding_every=3",
            "ti_log.create_image_every=0", "train.batch_size=2")
    path = config_text(tmp_path)
    assert run(path, *args) == 0
    reference = load_embedding(tmp_path / "out" / "kilnpot.pt").vectors
    copies = tmp_path / "logs" / TODAY / "kilnpot" / "embeddings"
    full_rows = read_csv(copies.parent / "textual_inversion_loss.csv")

    # continue from the step-3 copy and its .optim, into other folders: same vectors, same rates and losses
    resumed = (f"embedding.resume={(copies / 'kilnpot-3.pt').as_posix()}",
               f"save.output_dir={(tmp_path / 'b').as_posix()}", f"logging.log_dir={(tmp_path / 'b-logs').as_posix()}")
    capsys.readouterr()
    assert run(path, *args, *resumed) == 0
    assert "loaded the optimizer state" in capsys.readouterr().out
    assert torch.allclose(load_embedding(tmp_path / "b" / "kilnpot.pt").vectors, reference, atol=1e-6)
    rows = read_csv(tmp_path / "b-logs" / TODAY / "kilnpot" / "textual_inversion_loss.csv")
    assert [(r["step"], float(r["learn_rate"])) for r in rows] == [("4", 0.02), ("5", 0.01), ("6", 0.01)]
    assert [float(r["loss"]) for r in rows] == pytest.approx([float(r["loss"]) for r in full_rows[3:]], abs=1e-5)

    # an .optim that belongs to other vectors is refused with a message
    shutil.copy(copies / "kilnpot-6.pt.optim", copies / "kilnpot-3.pt.optim")
    assert run(path, *args, *resumed) == 0
    assert "saved with other vectors" in capsys.readouterr().out

    # already at the last step: says so and trains nothing
    done = (f"embedding.resume={(copies / 'kilnpot-6.pt').as_posix()}", f"save.output_dir={(tmp_path / 'c').as_posix()}")
    assert run(path, *args, *done) == 0
    assert "already trained for 6 steps" in capsys.readouterr().out
    assert not (tmp_path / "c").exists()


def sd2_wide_parts() -> ModelParts:
    """An SD 2.x-shaped model with the real text width (1024) but one small layer, so it builds fast."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=8, projection_dim=64, hidden_act="gelu",
                                            vocab_size=49408, max_position_embeddings=77))
        unet_config = json.loads((CONFIG_ROOT / "tiny-sd2" / "unet" / "config.json").read_text())
        unet = UNet2DConditionModel.from_config({**unet_config, "cross_attention_dim": 1024})
    tiny = build_builtin("tiny-sd2")
    return ModelParts(family=SD2, tokenizers=SD2.build_tokenizers(), text_encoders=[text.eval()], vae=tiny.vae,
                      unet=unet.eval(), noise_scheduler=tiny.noise_scheduler, v_prediction=True,
                      source="tiny-sd2-wide")


def test_sd2_width_embedding_trains_and_loads_in_diffusers(tmp_path, monkeypatch):
    use_parts(monkeypatch, sd2_wide_parts())
    assert run(config_text(tmp_path), "train.max_steps=2", "ti_log.create_image_every=0",
               "embedding.format=safetensors", "embedding.init_text=") == 0
    path = tmp_path / "out" / "kilnpot.safetensors"
    embedding = load_embedding(path)
    assert embedding.vectors.shape == (2, 1024) and embedding.vectors.abs().sum() > 0  # zeros at the start

    fresh = sd2_wide_parts()
    pipe = fresh.pipeline()
    pipe.load_textual_inversion(str(path), token="kilnpot")
    ids = fresh.tokenizer.convert_tokens_to_ids(["kilnpot", "kilnpot_1"])
    assert torch.equal(fresh.text_encoder.get_input_embeddings().weight[ids].detach(), embedding.vectors)


# ---------------------------------------------------------------------------------------------- config


MINIMAL = """
[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{train}"
[embedding]
name = "kilnpot"
[train]
max_steps = 10
"""


def ti_problems(tmp_path: Path, text: str, overrides=()) -> list[str]:
    (tmp_path / "train" / "1_x").mkdir(parents=True, exist_ok=True)
    path = tmp_path / "run.toml"
    path.write_text(text.replace("{train}", (tmp_path / "train").as_posix()), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_config(path, list(overrides), TEXTUAL_INVERSION)
    return info.value.problems


def test_config_defaults_follow_a1111_and_round_trip(tmp_path):
    (tmp_path / "train" / "1_x").mkdir(parents=True)
    path = tmp_path / "run.toml"
    path.write_text(MINIMAL.replace("{train}", (tmp_path / "train").as_posix()), encoding="utf-8")
    config = read_config(path, ["embedding.learn_rate=0.005"], TEXTUAL_INVERSION)
    assert config.embedding.learn_rate == "0.005"  # a number on the command line is a one-rate schedule
    assert (config.save.name, config.save.precision) == ("kilnpot", "fp32")
    assert (config.optimizer.lr, config.optimizer.max_grad_norm, config.optimizer.args) == (0.005, 0.0,
                                                                                          {"weight_decay": 0.0})
    assert TIRunConfig.model_validate(__import__("tomllib").loads(config_to_toml(config))) == config


def test_config_mistakes_are_reported_together(tmp_path):
    text = MINIMAL.replace('name = "kilnpot"', 'name = "cat"\ntemplate = "no_such_template"\n'
                                               'learn_rate = "0.05:10, 0.02:abc"')
    text = text.replace("[train]", "[optimizer]\nscheduler = \"cosine\"\n[train]")
    text = text.replace('train_dir = "{train}"', 'train_dir = "{train}"\nreg_dir = "{train}"\nshuffle_caption = true')
    joined = "\n".join(ti_problems(tmp_path, text))
    assert "'cat" in joined and "already a token" in joined
    assert "no_such_template" in joined and "subject_filewords" in joined
    assert "'0.02:abc'" in joined
    assert "embedding.learn_rate sets the whole learning-rate schedule" in joined
    assert "embedding.shuffle_tags" in joined and "dataset.reg_dir" in joined
    assert any("'embedding.vectors' = 76" in p for p in ti_problems(tmp_path, MINIMAL, ["embedding.vectors=76"]))


# ---------------------------------------------------------------------------------------------- prompts and data


def test_templates_and_file_name_captions():
    assert {"subject", "subject_filewords", "style", "style_filewords", "none", "name_filewords"} <= set(
        builtin_templates())
    assert template_lines("name_filewords") == ["[name], [filewords]"]
    assert template_lines("subject_filewords")[0] == "a photo of a [name], [filewords]"
    assert template_lines("[name] in a kiln") == ["[name] in a kiln"]
    assert template_lines(["a [name]", "", "  b [name] "]) == ["a [name]", "b [name]"]
    with pytest.raises(ValueError, match="neither a built-in template"):
        template_lines("missing_template")
    assert [filename_words(Path(n)) for n in ("01-kiln pot.png", "123 glazed bowl.jpg", "2023-01-05 raku.png",
                                              "kiln-01.png")] == ["kiln pot", "glazed bowl", "raku", "kiln-01"]


def make_items(tmp_path: Path) -> list[ImageItem]:
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., :3] = 180
    rgba[:, 32:, 3] = 255  # left half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "07-glazed bowl.png")
    Image.new("RGB", (64, 64), (90, 40, 20)).save(tmp_path / "jug.png")
    return [ImageItem(tmp_path / "07-glazed bowl.png", "", False, 1, False, 0),
            ImageItem(tmp_path / "jug.png", "red, clay, jug", True, 1, False, 0)]


def test_prompts_fill_templates_with_tags_shuffled_and_dropped(tmp_path):
    base = TrainingData(make_items(tmp_path), CaptionOptions(), 64, 2, seed=3)
    data = PromptedData(base, ["a [name] of [filewords]"], "kilnpot", 2, CaptionOptions(shuffle=True))
    assert data.filewords == ["glazed bowl", "red, clay, jug"]  # no caption file: the file name, as A1111
    prompts = {data.prompt(1, random.Random(seed)) for seed in range(30)}
    assert all(p.startswith("a kilnpot kilnpot_1 of ") for p in prompts) and len(prompts) > 1
    assert {tuple(sorted(p[len("a kilnpot kilnpot_1 of "):].split(", "))) for p in prompts} == {("clay", "jug", "red")}
    dropped = PromptedData(base, ["[filewords]"], "kilnpot", 1, CaptionOptions(tag_dropout_rate=1.0))
    assert dropped.prompt(1, random.Random(0)) == "" and not dropped.name_reaches_prompts()
    batch = data.batch(0, data.epoch_batches(0)[0])
    assert batch.captions == data.batch(0, data.epoch_batches(0)[0]).captions  # seeded: resume sees the same
    assert batch.loss_weight is None


def test_alpha_weights_the_loss_per_pixel(tmp_path):
    base = TrainingData(make_items(tmp_path), CaptionOptions(), 64, 2, seed=3)
    data = PromptedData(base, ["[name]"], "kilnpot", 1, CaptionOptions(), alpha_weight=True, latent_factor=8)
    weight = data.loss_weight(0, False)
    assert weight.shape == (1, 8, 8) and weight.min() == 0 and weight.mean() == pytest.approx(1.0)
    assert torch.all(weight[..., :4] == 0) and torch.allclose(weight[..., 4:], torch.tensor(2.0))
    assert torch.equal(data.loss_weight(0, True), weight.flip(-1))
    assert torch.equal(data.loss_weight(1, False), torch.ones(1, 8, 8))  # no alpha: weight 1
    assert data.batch(0, [0, 1]).loss_weight.shape == (2, 1, 8, 8)

    prediction, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ones = torch.ones(2, 1, 8, 8)
    assert torch.allclose(pixel_weighted_loss(prediction, target, ones), per_sample_loss(prediction, target))
    masked = target.clone()
    masked[..., :4] += 5.0  # a large error only where the weight is 0
    half = torch.stack([weight, weight])
    assert torch.allclose(pixel_weighted_loss(masked, target, half), torch.zeros(2))


def test_latent_sampling_methods(tmp_path):
    parts = build_builtin("tiny-sd15")
    base = TrainingData(make_items(tmp_path), CaptionOptions(), 64, 2, seed=3)
    batch = base.batch(0, [0, 1])
    mean, _ = encode_distribution(parts.vae, torch.stack([base.pixels(i, False) for i in batch.item_indices]))
    scale = parts.vae.config.scaling_factor

    def draws(method: str, cache: bool = True):
        source = LatentSource(base, parts.vae, "memory" if cache else "off", seed=3, draw=method)
        source.fill()
        return [source.latents(batch, 0, step_seed) for step_seed in (11, 12)]

    first, second = draws("deterministic")
    assert torch.allclose(first, mean * scale, atol=1e-6) and torch.equal(first, second)
    first, second = draws("once")
    assert torch.equal(first, second) and not torch.allclose(first, mean * scale, atol=1e-4)
    assert torch.allclose(draws("once", cache=False)[0], first, atol=1e-5)  # re-encoding draws the same sample
    first, second = draws("random")
    assert not torch.allclose(first, second, atol=1e-4)
    assert torch.equal(first, draws("random")[0])  # seeded by the step: a resumed run draws the same
