"""Config values are strictly typed: TOML has real types, so a boolean, a quoted number or a float where a whole
number belongs is an error naming the key, its file and line, what was expected and what was given — never
quietly converted (`optimizer.lr = true` used to train at lr 1.0)."""
from pathlib import Path

import pytest

import train_lora
from library.config.loading import ConfigError
from library.recipes.lora import RECIPE as LORA
from library.recipes.textual_inversion import RECIPE as TEXTUAL_INVERSION
from library.recipes.run import read_config

MINIMAL = """[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{train}"
[train]
max_steps = 10
"""


def write(tmp_path: Path, extra: str = "", name: str = "run.toml") -> Path:
    (tmp_path / "train" / "5_cat").mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(MINIMAL.replace("{train}", (tmp_path / "train").as_posix()) + extra, encoding="utf-8")
    return path


def problems_of(path: Path, overrides=(), recipe=LORA) -> list[str]:
    with pytest.raises(ConfigError) as info:
        read_config(path, list(overrides), recipe)
    return info.value.problems


def test_a_boolean_learning_rate_is_refused_with_key_line_and_types(tmp_path):
    problems = problems_of(write(tmp_path, "[optimizer]\nlr = true\n"))
    assert problems == [f"{tmp_path / 'run.toml'}:8: 'optimizer.lr' = true: expected a number, got a boolean"]


@pytest.mark.parametrize("line, text", [
    ('[optimizer]\nlr = "1e-4"', "'optimizer.lr' = \"1e-4\": expected a number, got a string; write it as a "
                                 "number, without quotes: 0.0001"),
    ("[train]\nbatch_size = 2.0", "'train.batch_size' = 2.0: expected a whole number, got a float; write 2"),
    ("[train]\nseed = true", "'train.seed' = true: expected a whole number, got a boolean"),
    ("[dataset]\nflip_aug = 1", "'dataset.flip_aug' = 1: expected true or false, got an integer"),
    ('[network]\ntrain_unet = "false"', "'network.train_unet' = \"false\": expected true or false, got a string; "
                                        "write false, without quotes"),
    ("[save]\nname = 5", "'save.name' = 5: expected a string (in quotes), got an integer; write it in quotes: \"5\""),
    ('[model]\nv_parameterization = "yes"', "'model.v_parameterization' = \"yes\": expected \"auto\" or true or "
                                            "false, got a string"),
])
def test_every_kind_of_wrong_type_is_one_problem_naming_the_key(tmp_path, line, text):
    section, key = line.split("\n")
    source = MINIMAL.replace("{train}", (tmp_path / "train").as_posix())
    if section in source:  # a section the minimal config has: add the key to it, not a second table
        path = write(tmp_path)
        path.write_text(source.replace(section, f"{section}\n{key}"), encoding="utf-8")
    else:
        path = write(tmp_path, line + "\n")
    problems = problems_of(path)
    assert len(problems) == 1 and text in problems[0], problems


def test_whole_numbers_stay_valid_for_float_keys_and_literals_and_unions_keep_working(tmp_path):
    path = write(tmp_path, "[optimizer]\nlr = 1\nmax_grad_norm = 0\n[network]\nalpha = 4\n")
    source = path.read_text(encoding="utf-8").replace("[model]\n", "[model]\nv_parameterization = true\n")
    path.write_text(source.replace("max_steps = 10", 'max_steps = 10\nmixed_precision = "bf16"\n'
                                   "max_token_length = 150"), encoding="utf-8")
    config = read_config(path, [], LORA)
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
    assert config.network.alpha == 4.0 and config.optimizer.max_grad_norm == 0.0
    assert config.model.v_parameterization is True and config.train.mixed_precision == "bf16"
    assert config.train.max_token_length == 150


def test_command_line_overrides_are_typed_by_toml_and_checked_the_same_way(tmp_path):
    path = write(tmp_path)
    config = read_config(path, ["optimizer.lr=5e-5", "network.train_unet=false", "save.name=my run",
                                "train.max_steps=7", "network.alpha=2", "dataset.caption_extension=.caption"], LORA)
    assert config.optimizer.lr == pytest.approx(5e-5) and config.network.train_unet is False
    assert config.save.name == "my run" and config.train.max_steps == 7 and config.network.alpha == 2.0
    assert problems_of(path, ["optimizer.lr=true"]) == [
        "command-line override: 'optimizer.lr' = true: expected a number, got a boolean"]
    assert problems_of(path, ["network.train_unet=True"]) == [
        "command-line override: 'network.train_unet' = \"True\": expected true or false, got a string; write true, "
        "without quotes"]
    (problem,) = problems_of(path, ["optimizer.lr=.0001"])  # not a TOML number: read as a word
    assert "write it as a number, without quotes: 0.0001" in problem


def test_a_wrong_type_in_a_base_file_names_the_base_file_and_line(tmp_path):
    base = write(tmp_path, "[optimizer]\nlr = false\n", name="base.toml")
    top = tmp_path / "run.toml"
    top.write_text('base = "base.toml"\n[network]\nrank = 4\n', encoding="utf-8")
    assert problems_of(top) == [f"{base}:8: 'optimizer.lr' = false: expected a number, got a boolean"]


def test_trainer_sections_are_strict_too_and_their_own_conversions_still_apply(tmp_path):
    path = write(tmp_path, '[embedding]\nname = "kilnstrict"\nlearn_rate = 0.005\nvectors = 2\n')
    config = read_config(path, [], TEXTUAL_INVERSION)
    assert config.embedding.learn_rate == "0.005"  # a number is the one-rate schedule, as documented
    problems = problems_of(path, ["embedding.vectors=true", "embedding.template=5"], TEXTUAL_INVERSION)
    assert "'embedding.vectors' = true: expected a whole number, got a boolean" in "\n".join(problems)
    assert "'embedding.template' = 5: expected a string (in quotes) or a list, got an integer" in "\n".join(problems)
    assert len(problems) == 2


def test_the_script_refuses_a_boolean_lr_before_any_model_loads(tmp_path, capsys):
    path = write(tmp_path)
    with pytest.raises(SystemExit) as exit:
        train_lora.main([str(path), "--check", "optimizer.lr=true"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    assert "'optimizer.lr' = true: expected a number, got a boolean" in err
