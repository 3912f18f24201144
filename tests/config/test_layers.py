"""Layered configs (`base = "file"`), where each value came from (--print-config --origins, error locations),
and the top-level `trainer` key, through the loader and the scripts users run."""
from pathlib import Path

import pytest

import train_dreambooth
import train_lora
from library.config.layers import key_lines
from library.config.loading import ConfigError
from library.config.trainers import infer_trainer
from library.recipes.lora import RECIPE as LORA
from library.recipes.run import read_config

BASE = """[model]
path = "builtin:tiny-sd15"
clip_skip = 2
[dataset]
train_dir = "images"
resolution = 64
shuffle_caption = true
[[dataset.subsets]]
image_dir = "images/10_kiln pot"
repeats = 3
[[dataset.subsets]]
image_dir = "images/10_kiln pot"
repeats = 4
[network]
rank = 8
alpha = 4
[optimizer]
warmup_ratio = 0.1
args = { weight_decay = 0.01, eps = 1e-8 }
[train]
max_steps = 100
"""


def layout(tmp: Path) -> tuple[Path, Path, Path]:
    """shared/base.toml ← style/middle.toml ← run.toml, the images beside the base only."""
    (tmp / "shared" / "images" / "10_kiln pot").mkdir(parents=True)
    (tmp / "style").mkdir()
    base = tmp / "shared" / "base.toml"
    base.write_text(BASE, encoding="utf-8")
    middle = tmp / "style" / "middle.toml"
    middle.write_text('base = "../shared/base.toml"\n[network]\nrank = 16\n[optimizer]\nargs = { eps = 1e-6 }\n',
                      encoding="utf-8")
    top = tmp / "run.toml"
    top.write_text('base = "style/middle.toml"\n\n[dataset]\nresolution = 128\n[[dataset.subsets]]\n'
                   'image_dir = "shared/images/10_kiln pot"\nrepeats = 7\n[train]\nepochs = 2\n'
                   '[optimizer]\nwarmup_steps = 5\n', encoding="utf-8")
    return base, middle, top


def test_bases_merge_at_any_depth_arrays_replace_and_exclusive_keys_follow_the_top(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, top = layout(tmp_path)
    config = read_config(top, [], LORA)
    assert config.model.clip_skip == 2 and config.dataset.shuffle_caption  # from the deepest base
    assert config.network.rank == 16 and config.network.alpha == 4  # middle over base, key by key
    assert config.optimizer.args == {"weight_decay": 0.01, "eps": 1e-6}  # tables merge inside sections too
    assert config.dataset.resolution == 128
    assert [(Path(s.image_dir).name, s.repeats) for s in config.dataset.subsets] == [("10_kiln pot", 7)]
    # the top's epochs / warmup_steps replace the base's max_steps / warmup_ratio instead of clashing
    assert (config.train.epochs, config.train.max_steps) == (2, None)
    assert (config.optimizer.warmup_steps, config.optimizer.warmup_ratio) == (5, 0.0)


def test_relative_paths_in_a_base_resolve_beside_the_base(tmp_path, monkeypatch):
    layout(tmp_path)
    monkeypatch.chdir(tmp_path / "style")  # the images are neither here nor beside run.toml
    config = read_config(tmp_path / "run.toml", ["dataset.subsets=[]"], LORA)
    assert Path(config.dataset.train_dir) == tmp_path / "shared" / "images"  # set in shared/base.toml


def test_print_config_origins_names_file_and_line_override_and_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base, middle, top = layout(tmp_path)
    assert train_lora.main([str(top), "--print-config", "--origins", "train.seed=9"]) == 0
    lines = {line.split("=")[0].strip(): line for line in capsys.readouterr().out.splitlines() if "=" in line}
    assert lines["clip_skip"].endswith(f"# {base}:3")
    assert lines["rank"].endswith(f"# {middle}:3")
    assert lines["resolution"].endswith(f"# {top}:4")
    assert lines["epochs"].endswith(f"# {top}:9")
    assert lines["seed"].endswith("# command-line override")
    assert lines["batch_size"].endswith("# default")
    assert lines["eps"].endswith(f"# {middle}:5") and lines["weight_decay"].endswith(f"# {base}:19")
    assert lines["repeats"].endswith(f"# {top}:7")


def test_errors_point_at_the_file_and_line_that_set_the_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base, _, top = layout(tmp_path)
    base.write_text(BASE.replace("alpha = 4", "alpha = -1\nrnak = 2"), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_config(top, [], LORA)
    problems = info.value.problems
    assert any(p.startswith(f"{base}:16: 'network.alpha' = -1") for p in problems), problems
    assert any(p.startswith(f"{base}:17: unknown key 'network.rnak'") for p in problems), problems


def test_a_missing_base_and_a_loop_are_one_line_each(tmp_path, capsys):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('base = "b.toml"\n[train]\nmax_steps = 1\n', encoding="utf-8")
    b.write_text('# comment\nbase = "a.toml"\n', encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        train_lora.main([str(a), "--check"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{b}:2: the chain of base files loops: {a} → {b} → {a}" in err and "Traceback" not in err
    b.write_text('base = "missing/c.toml"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_config(a, [], LORA)
    assert info.value.problems == [f"{b}:1: base = 'missing/c.toml': file not found ({tmp_path / 'missing/c.toml'}; "
                                   "a base is relative to the file that names it)"]


def test_trainer_key_is_checked_by_every_trainer_and_inferred_when_absent(tmp_path, capsys):
    (tmp_path / "img" / "1_x").mkdir(parents=True)
    path = tmp_path / "ti.toml"
    path.write_text(f'trainer = "textual_inversion"\n[model]\npath = "builtin:tiny-sd15"\n[dataset]\n'
                    f'train_dir = "{(tmp_path / "img").as_posix()}"\n[embedding]\nname = "kilnpotq"\n'
                    '[train]\nmax_steps = 2\n', encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        train_dreambooth.main([str(path), "--check"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: 1 problem(s) in the config:",
                   f"  - {path}:1: trainer = 'textual_inversion': this config is for train_textual_inversion.py, "
                   "not train_dreambooth.py; run: python train_textual_inversion.py <config>"]
    with pytest.raises(ConfigError) as info:
        read_config(path, ["trainer=lora_xl"], LORA)
    assert "trainer = 'lora_xl' is not a Kiln trainer" in info.value.problems[0]
    assert infer_trainer({"embedding": {}}) == "textual_inversion"
    assert infer_trainer({"dreambooth": {}, "model": {}}) == "dreambooth"
    assert infer_trainer({"model": {}}) == "lora" and infer_trainer({"trainer": "dreambooth"}) == "dreambooth"


def test_key_lines_skip_multiline_values():
    text = ('a = 1\n[s]\nlist = [\n  "x=1",\n  "y=2",\n]\nkey = """\nnot = a key\n"""\nlast = 2\n'
            '[[t.u]]\nv = 1\n[[t.u]]\nv = 2\n')
    lines = key_lines(text)
    assert lines[("a",)] == 1 and lines[("s", "list")] == 3 and lines[("s", "last")] == 10
    assert ("s", '"x') not in lines and ("s", "not") not in lines
    assert lines[("t", "u", 0, "v")] == 12 and lines[("t", "u", 1, "v")] == 14
