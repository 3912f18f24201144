"""train_dreambooth.py end to end on the built-in tiny model: the whole model learns, prior images count with
their weight, class images are generated once, the text encoder stops on time, and the saved models load in
our loader and in diffusers."""
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

import train_dreambooth
from tests.helpers import training_set_loss
from library.models import ldm_layout as layout
from library.config.loading import ConfigError
from library.models.saving import save_model
from library.models.builtin import build_builtin
from library.models.loading import load_model
from library.models.diffusers_folder import save_diffusers
from library.recipes.dreambooth import RECIPE as DREAMBOOTH
from library.recipes.run import read_config

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "examples" / "sample_dataset"


def config_text(tmp: Path, reg: bool = True) -> Path:
    data = tmp / "data"
    if not data.exists():
        shutil.copytree(SAMPLES, data, ignore=shutil.ignore_patterns("*.md"))
    reg_dir = (data / "reg").as_posix() if reg else ""
    text = f"""
[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{(data / 'train').as_posix()}"
reg_dir = "{reg_dir}"
resolution = 64
[dreambooth]
unet_lr = 1e-3
[optimizer]
lr = 1e-3
[train]
max_steps = 2
batch_size = 4
seed = 7
[save]
output_dir = "{(tmp / 'out').as_posix()}"
name = "t"
precision = "fp32"
[logging]
log_dir = "{(tmp / 'logs').as_posix()}"
"""
    path = tmp / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def run(path: Path, *overrides: str) -> int:
    return train_dreambooth.main([str(path), *overrides])


def unet_weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(layout.UNET_PREFIX)}


def text_weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("cond_stage_model.")}


def same(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def assert_same_models(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        expected, actual = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert set(expected) <= set(actual), name
        different = [k for k in expected if not torch.equal(expected[k], actual[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:2]}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run with prior preservation and text-encoder training that stops at step 4 of 8; saves every 2."""
    tmp = tmp_path_factory.mktemp("db")
    path = config_text(tmp)
    assert run(path, "train.max_steps=8", "dreambooth.train_text_encoder=true",
               "dreambooth.stop_text_encoder_training=4", "dreambooth.text_encoder_lr=1e-4",
               "save.every_n_steps=2") == 0
    return tmp


def test_fine_tune_learns_and_single_file_loads_in_our_loader_and_diffusers(trained):
    final = trained / "out" / "t.safetensors"
    tuned = load_model(str(final))
    base = build_builtin("tiny-sd15")
    before, after = (training_set_loss(m, trained / "data" / "train") for m in (base, tuned))
    assert after < before * 0.9, (before, after)

    config_folder = trained / "base-diffusers"  # diffusers needs a local config folder to stay offline
    save_diffusers(base, config_folder)
    pipe = StableDiffusionPipeline.from_single_file(str(final), config=str(config_folder), local_files_only=True,
                                                    safety_checker=None)
    assert_same_models(tuned, pipe)
    assert not torch.equal(tuned.unet.conv_out.weight, base.unet.conv_out.weight)


def test_text_encoder_stops_at_the_configured_step(trained, capsys):
    out = trained / "out"
    files = {step: out / f"t-step{step:08d}.safetensors" for step in (2, 4, 6)}
    files[8] = out / "t.safetensors"
    assert not same(text_weights(files[2]), text_weights(files[4]))  # trained until step 4
    assert same(text_weights(files[4]), text_weights(files[6]))  # then frozen
    assert same(text_weights(files[4]), text_weights(files[8]))
    assert not same(unet_weights(files[4]), unet_weights(files[6]))  # while the UNet goes on


def write_reg_variant(tmp: Path, name: str, invert: bool) -> Path:
    """A reg folder with the sample reg images' names and count, optionally with other pixels."""
    folder = tmp / name / "1_pot"
    folder.mkdir(parents=True)
    for source in sorted((SAMPLES / "reg" / "1_pot").iterdir()):
        if source.suffix == ".txt":
            shutil.copy(source, folder / source.name)
        else:
            image = Image.open(source).convert("RGB")
            if invert:
                image = Image.eval(image, lambda v: 255 - v)
            image.save(folder / source.name)
    return folder.parent


def test_prior_images_count_with_prior_loss_weight(tmp_path):
    path = config_text(tmp_path)
    reg_a, reg_b = write_reg_variant(tmp_path, "reg_a", False), write_reg_variant(tmp_path, "reg_b", True)

    def final(reg: Path, weight: float, name: str) -> dict[str, torch.Tensor]:
        assert run(path, f"dataset.reg_dir={reg.as_posix()}", f"dataset.prior_loss_weight={weight}",
                   f"save.name={name}") == 0
        return unet_weights(tmp_path / "out" / f"{name}.safetensors")

    # weight 0: what the reg images show cannot matter; weight 1: it does
    assert same(final(reg_a, 0.0, "a0"), final(reg_b, 0.0, "b0"))
    assert not same(final(reg_b, 1.0, "b1"), unet_weights(tmp_path / "out" / "b0.safetensors"))


def test_class_images_generated_once_next_to_user_images(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    class_dir = tmp_path / "class" / "1_pot"
    class_dir.mkdir(parents=True)
    user = {"my dog.png": Image.new("RGB", (64, 64), "red"), "kiln-class-00000.jpg": Image.new("RGB", (64, 64))}
    for name, image in user.items():
        image.save(class_dir / name)
    user_bytes = {name: (class_dir / name).read_bytes() for name in user}
    overrides = [f"save.output_dir={(tmp_path / 'out').as_posix()}",
                 f"logging.log_dir={(tmp_path / 'logs').as_posix()}", f"dreambooth.class_dir={class_dir.as_posix()}", "dreambooth.num_class_images=4",
                 "dreambooth.class_sampling_steps=2", "train.max_steps=1", "save.every_n_steps=0"]
    preset = REPO / "configs" / "quickstart_dreambooth.toml"

    assert train_dreambooth.main([str(preset), "--check", *overrides]) == 0
    assert "the 2 missing will be generated" in capsys.readouterr().out
    assert sorted(p.name for p in class_dir.iterdir()) == sorted(user)  # --check writes nothing

    assert train_dreambooth.main([str(preset), *overrides]) == 0
    out = capsys.readouterr().out
    generated = sorted(p.name for p in class_dir.iterdir() if p.name not in user)
    # the user's kiln-class-00000.jpg keeps its name: new files take free numbers
    assert generated == ["kiln-class-00001.png", "kiln-class-00001.txt", "kiln-class-00002.png",
                         "kiln-class-00002.txt"]
    assert all((class_dir / name).read_bytes() == data for name, data in user_bytes.items())
    assert (class_dir / "kiln-class-00001.txt").read_text(encoding="utf-8").strip() == "a photo of a pot"
    assert Image.open(class_dir / "kiln-class-00001.png").size == (64, 64)
    assert f"reg   {class_dir}: captions 2 found / 2 missing; 4 images" in out  # they joined the run

    stamps = {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()}
    assert train_dreambooth.main([str(preset), *overrides, "save.overwrite=true"]) == 0
    assert "none to generate" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()} == stamps


def test_diffusers_folders_are_pruned_protected_and_resume_exactly(tmp_path, capsys):
    path = config_text(tmp_path, reg=False)
    args = ["train.max_steps=4", "dreambooth.save_format=diffusers", "dreambooth.train_text_encoder=true",
            "dreambooth.stop_text_encoder_training=2", "save.every_n_steps=1", "save.keep_last=1",
            "save.save_state=true"]
    assert run(path, *args) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["t", "t-state", "t-step00000003", "t-step00000003-state",
                                                        "t.run.json"]
    reference = load_model(str(out / "t"))

    with pytest.raises(SystemExit):  # a folder output is protected like a file
        run(path, *args)
    assert "already holds output of a run named 't'" in capsys.readouterr().err

    # resume past the text-encoder stop: it must stay frozen, so the result is identical
    state = (out / "t-step00000003-state").as_posix()
    assert run(path, *args, f"save.resume={state}", f"save.output_dir={(tmp_path / 'b').as_posix()}") == 0
    assert_same_models(reference, load_model(str(tmp_path / "b" / "t")))


def test_config_rules(tmp_path):
    path = config_text(tmp_path)

    def problems(*overrides: str) -> str:
        with pytest.raises(ConfigError) as info:
            read_config(path, list(overrides), DREAMBOOTH)
        return "\n".join(info.value.problems)

    assert "needs dreambooth.class_prompt" in problems("dreambooth.num_class_images=5",
                                                       f"dreambooth.class_dir={tmp_path.as_posix()}/c/1_dog")
    assert "needs dreambooth.class_dir" in problems("dreambooth.num_class_images=5", "dreambooth.class_prompt=dog")
    assert "name the folder NN_name" in problems(f"dreambooth.class_dir={tmp_path.as_posix()}/dogs")
    assert "train_text_encoder = false" in problems("dreambooth.stop_text_encoder_training=10")
    config = read_config(path, [], DREAMBOOTH)
    assert (config.save.name, config.optimizer.lr) == ("t", 1e-3)  # explicit values win over the defaults
    minimal = tmp_path / "minimal.toml"
    minimal.write_text(f'[model]\npath = "builtin:tiny-sd15"\n[dataset]\ntrain_dir = "{tmp_path.as_posix()}/data/train"'
                       '\n[train]\nmax_steps = 10\n', encoding="utf-8")
    bare = read_config(minimal, [], DREAMBOOTH)
    assert (bare.save.name, bare.optimizer.lr) == ("dreambooth", 2e-6)  # a whole model wants a gentle rate
    assert bare.dreambooth.save_format == "single_file" and not bare.dreambooth.train_text_encoder


def test_half_precision_diffusers_folder_leaves_the_training_model_alone(tmp_path):
    parts = build_builtin("tiny-sd15")
    save_model(parts, tmp_path / "half", torch.float16)
    assert parts.unet.conv_out.weight.dtype == torch.float32  # training goes on in fp32
    stored = load_file(str(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(t.dtype == torch.float16 for t in stored.values())
    loaded = load_model(str(tmp_path / "half"))
    assert torch.allclose(loaded.unet.conv_out.weight, parts.unet.conv_out.weight, atol=1e-3)
    assert torch.allclose(loaded.text_encoder.get_input_embeddings().weight,
                          parts.text_encoder.get_input_embeddings().weight, atol=1e-3)


def test_bf16_checkpointing_and_8bit_adam_keep_the_weights_in_full_precision(tmp_path):
    """Mixed precision computes in bf16, but the weights being fine-tuned must never be rounded to it: with a
    vanishing learning rate the saved model equals the base to fp32 accuracy."""
    path = config_text(tmp_path, reg=False)
    assert run(path, "train.max_steps=1", "train.mixed_precision=bf16", "train.gradient_checkpointing=true",
               "optimizer.name=AdamW8bit", "optimizer.lr=1e-12", "dreambooth.unet_lr=1e-12",
               "dreambooth.train_text_encoder=true") == 0
    tuned = load_model(str(tmp_path / "out" / "t.safetensors"))
    base = build_builtin("tiny-sd15")
    for name in ("unet", "text_encoder"):
        for (key, a), b in zip(getattr(base, name).state_dict().items(), getattr(tuned, name).state_dict().values()):
            assert torch.allclose(a, b, rtol=0, atol=1e-9), f"{name}.{key}"


def test_a_bad_dataset_is_reported_before_class_images_load_the_model(tmp_path, capsys, monkeypatch):
    """Class images are generated with the model; the user's folders are scanned first, so a broken caption
    costs a second, not a model load and generation."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the dataset problem was reported")

    monkeypatch.setattr("library.models.loading.load_model", no_model)
    path = config_text(tmp_path, reg=False)
    broken = next((tmp_path / "data" / "train").rglob("*.txt"))
    broken.write_bytes(b"a \xff caption")
    class_dir = tmp_path / "class" / "1_pot"
    code = run(path, f"dreambooth.class_dir={class_dir.as_posix()}", "dreambooth.num_class_images=2",
               "dreambooth.class_prompt=a photo of a pot")
    assert code == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "not valid UTF-8" in err and "Traceback" not in err
