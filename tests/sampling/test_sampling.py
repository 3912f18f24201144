"""Preview sampling: kohya prompt lines, samples during training (files + TensorBoard) that leave training
bit-identical, and the fp32 VAE fallback that prevents black previews."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_lora
from library.models.builtin import build_builtin
from library.sampling.prompt_file import PromptError, canonical_sampler, parse_prompt_line, parse_prompt_lines
from library.sampling.prompt_file import SampleSpec
from library.sampling.preview import decode_latents, generate
from tests.recipes.test_train_lora import config_text


def test_prompt_line_with_every_option_parses():
    line = "a photo of sks dog, best quality --n lowres, blurry --w 512 --h 768 --s 28 --l 7.5 --d 1234 --ss DPM++ 2M Karras"
    options = parse_prompt_line(line)
    assert options.prompt == "a photo of sks dog, best quality"
    assert options.negative_prompt == "lowres, blurry"
    assert (options.width, options.height, options.steps, options.cfg_scale, options.seed) == (512, 768, 28, 7.5, 1234)
    assert options.sampler == "dpm++ 2m karras"
    assert parse_prompt_line("  # a comment --w 64") is None and parse_prompt_line("   ") is None
    assert canonical_sampler("k_euler_a") == "euler_a" and canonical_sampler("Euler a") == "euler_a"


def test_bad_prompt_line_names_source_and_line():
    with pytest.raises(PromptError, match=r"prompts.txt:3: --w 65"):
        parse_prompt_lines(["# header", "a dog", "a cat --w 65"], "prompts.txt")
    with pytest.raises(PromptError, match="unknown option --x"):
        parse_prompt_lines(["a dog --x 3"], "p.txt")


def test_every_sampler_renders_and_keeps_rng_and_modes():
    parts = build_builtin("tiny-sd15")
    parts.unet.train()
    parts.text_encoder.eval()
    parts.text_encoder.encoder.train()  # a partly-training model keeps its mixed modes
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    images = [generate(parts, SampleSpec("a pot", width=64, height=64, steps=2, seed=3, sampler=name))
              for name in ("euler_a", "euler", "ddim", "dpm++ 2m", "dpm++ 2m karras")]
    assert torch.equal(torch.rand(3), expected)
    assert parts.unet.training and not parts.text_encoder.training and parts.text_encoder.encoder.training
    assert all(image.size == (64, 64) for image in images)
    again = generate(parts, SampleSpec("a pot", width=64, height=64, steps=2, seed=3, sampler="euler_a"))
    assert again.tobytes() == images[0].tobytes()  # fixed seed: the same image every time


def test_half_precision_vae_overflow_decodes_in_fp32():
    vae = build_builtin("tiny-sd15").vae
    torch.nn.Module.to(vae, torch.float16)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3e4
    with torch.no_grad():
        assert not torch.isfinite(vae.decode(latents.half() / vae.config.scaling_factor).sample).all()
        pixels = decode_latents(vae, latents)
    assert torch.isfinite(pixels).all()
    assert vae.dtype == torch.float16  # cast back for the next decode


def _sample_args(tmp_path: Path) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# previews\na kiln pot --n blurry --s 2 --d 11\n\na vase --ss ddim\n", encoding="utf-8")
    return ["sample.every_n_steps=2", "sample.every_n_epochs=1", "sample.before_training=true",
            f'sample.prompt_file="{prompts.as_posix()}"', "sample.steps=2"]


def test_samples_appear_in_files_and_tensorboard_and_training_is_unchanged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["train.max_steps=5", "network.dropout=0.2", "network.rank=2", "dataset.flip_aug=false"]
    plain, sampled = tmp_path / "plain", tmp_path / "sampled"
    plain.mkdir(), sampled.mkdir()
    assert train_lora.main([str(config_text(plain)), *common]) == 0
    assert train_lora.main([str(config_text(sampled)), *common, *_sample_args(sampled)]) == 0

    before = load_file(str(plain / "out" / "t.safetensors"))
    after = load_file(str(sampled / "out" / "t.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)

    files = sorted(p.name for p in (sampled / "out" / "samples").glob("*.png"))
    steps = sorted({name.split("-")[1] for name in files})
    assert steps[:3] == ["s000000", "s000002", "s000004"]
    assert "t-s000000-e000000-00.png" in files and "t-s000002-e000001-01.png" in files
    assert all(len([f for f in files if f.split("-")[1] == s]) == 2 for s in steps)  # both prompts each time
    assert not (plain / "out" / "samples").exists()

    events = next((sampled / "logs").glob("t-*"))
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
    accumulator.Reload()
    assert set(accumulator.Tags()["images"]) == {"samples/00", "samples/01"}
    assert [event.step for event in accumulator.Images("samples/00")][:3] == [0, 2, 4]


def test_sample_section_errors_are_clear(tmp_path, capsys):
    path = str(config_text(tmp_path))
    with pytest.raises(SystemExit):
        train_lora.main([path, "sample.every_n_steps=2", "--check"])
    assert "sample.prompts or sample.prompt_file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_lora.main([path, 'sample.prompts=["a --w 13"]', "sample.sampler=heun", "--check"])
    err = capsys.readouterr().err
    assert "sample.prompts:1: --w 13" in err and "unknown sampler 'heun'" in err


def test_textual_inversion_and_dreambooth_write_previews(tmp_path):
    """The [sample] section works in every trainer; in TI the embedding's name is spelled out for the prompt."""
    import train_dreambooth
    import train_textual_inversion
    from tests.recipes import test_dreambooth, test_train_ti

    ti_dir, db_dir = tmp_path / "ti", tmp_path / "db"
    ti_dir.mkdir(), db_dir.mkdir()
    samples = ['sample.prompts=["a photo of kilnpot --s 2 --d 3"]', "sample.every_n_steps=2", "sample.steps=2"]
    assert train_textual_inversion.main([str(test_train_ti.config_text(ti_dir)), "train.max_steps=2",
                                         "ti_log.create_image_every=0", *samples]) == 0
    assert [p.name for p in (ti_dir / "out" / "samples").glob("*.png")] == ["kilnpot-s000002-e000001-00.png"]
    from PIL import Image
    with Image.open(ti_dir / "out" / "samples" / "kilnpot-s000002-e000001-00.png") as image:
        assert image.text["parameters"].startswith("a photo of kilnpot kilnpot_1\n")  # both vectors used
    assert train_dreambooth.main([str(test_dreambooth.config_text(db_dir, reg=False)), "train.max_steps=2",
                                  *samples]) == 0
    assert len(list((db_dir / "out" / "samples").glob("t-s000002-*.png"))) == 1
