"""The run step: config keys become resolved values once (latent mode, draw and cache folder, warmup, dtypes,
schedule), recipes add their folders and plan changes, and validating a config changes nothing."""
from pathlib import Path

import pytest
import torch

from library.config.loading import load_config
from library.recipes.dreambooth import RECIPE as DREAMBOOTH
from library.recipes.lora import RECIPE as LORA
from library.recipes.textual_inversion import RECIPE as TEXTUAL_INVERSION
from tests.helpers import resolved_run, write_run_config

TI_BODY = '[embedding]\nname = "kilnres"\n'


def test_lora_latents_are_cached_once_or_drawn_every_step(tmp_path):
    _, run = resolved_run(LORA, tmp_path)
    assert (run.latent_mode, run.latent_draw, run.cache_dir) == ("memory", "once", None)
    _, run = resolved_run(LORA, tmp_path, overrides=("dataset.cache_latents=off",))
    assert (run.latent_mode, run.latent_draw) == ("off", "step")
    _, run = resolved_run(LORA, tmp_path, overrides=("dataset.cache_latents=disk",))
    assert run.latent_mode == "disk" and run.cache_dir == tmp_path / "train" / ".kiln-cache"
    assert any("latent cache:" in note for note in run.notes)


def test_textual_inversion_draws_latents_its_configured_way(tmp_path):
    for method in ("once", "deterministic", "random"):
        _, run = resolved_run(TEXTUAL_INVERSION, tmp_path, TI_BODY,
                              overrides=(f"embedding.latent_sampling_method={method}",))
        assert run.latent_draw == method


def test_warmup_dtypes_and_device_are_resolved(tmp_path):
    _, run = resolved_run(LORA, tmp_path, overrides=("optimizer.warmup_ratio=0.25", "train.max_steps=10",
                                                     "save.precision=bf16", "train.mixed_precision=bf16",
                                                     "train.device=cpu"))
    assert run.warmup_steps == 3  # 0.25 × 10 rounded half up
    assert run.save_dtype == torch.bfloat16 and run.weight_dtype == torch.bfloat16
    assert run.device == torch.device("cpu") and run.lr_schedule is None


def test_a1111_schedule_string_ends_the_plan_at_its_last_step(tmp_path):
    _, run = resolved_run(TEXTUAL_INVERSION, tmp_path, TI_BODY,
                          overrides=('embedding.learn_rate="0.05:3, 0.02:5"', "train.max_steps=20"))
    assert run.plan.total_steps == 5 and run.lr_schedule == "0.05:3, 0.02:5"
    assert any("ends at step 5" in note for note in run.notes)


def test_dreambooth_class_dir_joins_as_a_reg_folder_without_changing_the_config(tmp_path):
    class_dir = tmp_path / "class" / "1_pot"
    class_dir.mkdir(parents=True)
    body = f'[dreambooth]\nclass_dir = "{class_dir.as_posix()}"\n'
    config_path = write_run_config(tmp_path, body)
    for image in sorted((tmp_path / "train").rglob("*.png"))[:2]:
        (class_dir / image.name).write_bytes(image.read_bytes())
    config, run = resolved_run(DREAMBOOTH, tmp_path, body)
    assert config.dataset.subsets == []  # the config is as the user wrote it
    reg = [s for s in run.scan.subsets if s.is_reg]
    assert [s.image_dir for s in reg] == [class_dir] and run.plan.reg_samples > 0
    validated = load_config(config_path, [], DREAMBOOTH.config_class)  # the pure schema, twice
    assert validated.dataset.subsets == [] and validated == load_config(config_path, [], DREAMBOOTH.config_class)


@pytest.mark.parametrize("recipe, key", [(LORA, "network.train_text_encoder"),
                                         (DREAMBOOTH, "dreambooth.train_text_encoder")])
def test_text_encoder_cache_refusal_names_the_recipes_key(tmp_path, recipe, key):
    with pytest.raises(ValueError, match=key):
        resolved_run(recipe, tmp_path, overrides=("dataset.cache_text_encoder_outputs=true",
                                                  f"{key}=true"))


def test_environment_problems_come_with_schema_problems(tmp_path):
    from library.config.loading import ConfigError
    from library.recipes.run import read_config

    path = write_run_config(tmp_path, '[network]\nrank = "x"\ninit_weights = "nowhere.safetensors"\n')
    with pytest.raises(ConfigError) as info:
        read_config(path, ["optimizer.name=Adamw9", "sample.sampler=heun"], LORA)
    joined = "\n".join(info.value.problems)
    assert len(info.value.problems) == 4, joined
    assert "'network.rank'" in joined and "network.init_weights: file not found" in joined
    assert "unknown optimizer 'Adamw9'" in joined and "unknown sampler 'heun'" in joined


def test_paths_resolve_beside_the_config_when_not_found_here(tmp_path, monkeypatch):
    _ = write_run_config(tmp_path, "")
    (tmp_path / "init.safetensors").write_bytes(b"")
    monkeypatch.chdir(Path("/"))
    config, _ = resolved_run(LORA, tmp_path, '[network]\ninit_weights = "init.safetensors"\n')
    assert Path(config.network.init_weights) == tmp_path / "init.safetensors"


def test_processes_checking_one_output_folder_at_once_do_not_trip_over_each_other(tmp_path):
    """The processes of a data-parallel run check the same folders at the same moment (a shared probe file name
    once made one of them fail, at random)."""
    from concurrent.futures import ThreadPoolExecutor

    from library.recipes.resolve import check_writable

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: [check_writable(tmp_path / "out", "save.output_dir") for _ in range(50)], range(8)))
    assert list((tmp_path / "out").iterdir()) == []  # no probe left behind
