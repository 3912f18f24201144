"""Config loading: every shipped preset validates; every kind of mistake is reported with its location."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from library.config.loading import ConfigError, config_to_toml, parse_override, read_raw_config
from library.config.trainers import infer_trainer
from library.recipes.lora import LoraRunConfig
from library.recipes.dreambooth import RECIPE as DREAMBOOTH
from library.recipes.embedding_finetune import RECIPE as EMBEDDING_FINETUNE
from library.recipes.hypernetwork import RECIPE as HYPERNETWORK
from library.recipes.lora import RECIPE as LORA
from library.recipes.textual_inversion import RECIPE as TEXTUAL_INVERSION
from library.recipes.run import read_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.toml"))
MINIMAL = """
[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{train}"
[train]
max_steps = 10
"""


def config_class_for(path: Path):
    """The recipe the queue would pick: the preset's `trainer` key, or its sections (library/config/trainers.py)."""
    trainer = infer_trainer(read_raw_config(path, []).data)
    return {"lora": LORA, "textual_inversion": TEXTUAL_INVERSION, "dreambooth": DREAMBOOTH,
            "hypernetwork": HYPERNETWORK, "embedding_finetune": EMBEDDING_FINETUNE}[trainer]


def test_presets_are_read_as_the_trainer_their_name_says():
    expected = {"quickstart_ti.toml": TEXTUAL_INVERSION, "ti_seed_tutorial.toml": TEXTUAL_INVERSION,
                "dreambooth_sd15.toml": DREAMBOOTH, "quickstart_dreambooth.toml": DREAMBOOTH,
                "lora_sd15_locon.toml": LORA, "ti_sdxl.toml": TEXTUAL_INVERSION, "dreambooth_sdxl.toml": DREAMBOOTH,
                "hypernetwork_sd15.toml": HYPERNETWORK, "quickstart_hypernetwork.toml": HYPERNETWORK,
                "embedding_finetune_sd15.toml": EMBEDDING_FINETUNE, "quickstart_embedding_finetune.toml": EMBEDDING_FINETUNE}
    for path in CONFIGS:
        assert config_class_for(path) is expected.get(path.name, LORA), path.name


# Presets for real models point at files users have and we don't ship; only those keys are swapped for the test.
PLACEHOLDER_KEYS = {"model.path": "builtin:tiny-sd15", "dataset.train_dir": "examples/sample_dataset/train"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    placeholders = dict(PLACEHOLDER_KEYS, **({"model.path": "builtin:tiny-sdxl"} if "sdxl" in path.name else {}))
    overrides = [] if path.name.startswith("quickstart") else [f"{k}={v}" for k, v in placeholders.items()]
    config = read_config(path, overrides, config_class_for(path))
    assert config.model.path
    if overrides:  # and without the swap, the only problems are exactly those placeholders
        with pytest.raises(ConfigError) as info:
            read_config(path, [], config_class_for(path))
        assert all(p.split(":")[0] in PLACEHOLDER_KEYS for p in info.value.problems), info.value.problems


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "train" / "5_cat").mkdir(parents=True, exist_ok=True)
    path = tmp_path / "run.toml"
    path.write_text(text.replace("{train}", str(tmp_path / "train").replace("\\", "/")), encoding="utf-8")
    return path


def problems_of(path, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        read_config(path, list(overrides), LORA)
    return info.value.problems


def test_minimal_config_loads_with_defaults(tmp_path):
    config = read_config(write(tmp_path, MINIMAL), [], LORA)
    assert config.train.max_steps == 10
    assert config.network.rank == 16 and config.optimizer.name == "AdamW"


def test_all_problems_reported_together_with_locations(tmp_path):
    text = MINIMAL + """
[network]
rnak = 4
dropout = 2.0
[optimizer]
name = "AdamW9bit"
[save]
precision = "fp8"
"""
    text = text.replace('train_dir = "{train}"', 'train_dir = "{train}"\nreg_dir = "no/such/folder"')
    problems = problems_of(write(tmp_path, text))
    joined = "\n".join(problems)
    assert len(problems) == 5, joined
    assert "unknown key 'network.rnak'; did you mean 'rank'?" in joined
    assert "run.toml:11" in joined  # the line of `rnak = 4`
    assert "'network.dropout' = 2.0" in joined
    assert "'save.precision' = 'fp8'" in joined
    assert "dataset.reg_dir: folder not found: no/such/folder" in joined
    assert "optimizer.name" in joined and "AdamW8bit" in joined  # did-you-mean from the registry


def test_unknown_section_is_an_error(tmp_path):
    problems = problems_of(write(tmp_path, MINIMAL + "[trian]\nseed = 1\n"))
    assert any("unknown key 'trian'" in p and "did you mean 'train'" in p for p in problems)


def test_wrong_type_names_key_and_value(tmp_path):
    problems = problems_of(write(tmp_path, MINIMAL.replace("max_steps = 10", 'max_steps = "ten"')))
    assert any("'train.max_steps' = \"ten\": expected a whole number, got a string" in p for p in problems)


def test_steps_or_epochs_exactly_one(tmp_path):
    problems = problems_of(write(tmp_path, MINIMAL.replace("max_steps = 10", "max_steps = 10\nepochs = 2")))
    assert any("exactly one of train.max_steps and train.epochs" in p for p in problems)


def test_missing_required_and_bad_model_path(tmp_path):
    text = MINIMAL.replace('path = "builtin:tiny-sd15"', 'path = "models/nope.safetensors"')
    problems = problems_of(write(tmp_path, text))
    assert any(p.startswith("model.path:") and "nope.safetensors" in p for p in problems)
    problems = problems_of(write(tmp_path, MINIMAL.replace("[train]\nmax_steps = 10", "")))
    assert any("'train' is required" in p for p in problems)


def test_overrides_apply_and_are_typed(tmp_path):
    path = write(tmp_path, MINIMAL)
    config = read_config(path, ["train.max_steps=25", "network.rank=4", "save.name=my run", "optimizer.lr=3e-4"],
                         LORA)
    assert config.train.max_steps == 25 and config.network.rank == 4
    assert config.save.name == "my run" and config.optimizer.lr == pytest.approx(3e-4)
    problems = problems_of(path, ["train.max_stesp=5"])
    assert problems == ["command-line override: unknown key 'train.max_stesp'; did you mean 'max_steps'?"]
    assert parse_override("optimizer.args={weight_decay=0.1}") == (["optimizer", "args"], {"weight_decay": 0.1})
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("max_steps")


def test_random_crop_with_cached_latents_is_refused(tmp_path):
    text = MINIMAL.replace('train_dir = "{train}"', 'train_dir = "{train}"\nrandom_crop = true')
    problems = problems_of(write(tmp_path, text))
    assert any("random_crop" in p and "cache_latents" in p for p in problems)


def test_print_config_round_trips(tmp_path):
    config = read_config(write(tmp_path, MINIMAL), ["network.rank=3"], LORA)
    again = LoraRunConfig.model_validate(tomllib.loads(config_to_toml(config)))
    assert again == config


def test_cli_check_reports_config_errors_without_traceback(tmp_path):
    path = write(tmp_path, MINIMAL + "[network]\nrnak = 4\n")
    result = subprocess.run([sys.executable, str(REPO / "train_lora.py"), str(path), "--check"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "did you mean 'rank'" in result.stderr and "Traceback" not in result.stderr


def test_sample_prompt_file_is_checked_and_found_beside_the_config(tmp_path, monkeypatch):
    path = write(tmp_path, MINIMAL + "[sample]\nprompt_file = \"prompts.txt\"\nevery_n_steps = 5\n")
    problems = problems_of(path)
    assert any("sample.prompt_file: file not found: prompts.txt" in p for p in problems)
    (tmp_path / "prompts.txt").write_text("a kiln pot --w 64 --h 64 --s 2\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path.parent)  # run from elsewhere: the path resolves against the config's folder
    config = read_config(path, [], LORA)
    assert Path(config.sample.prompt_file) == tmp_path / "prompts.txt"
