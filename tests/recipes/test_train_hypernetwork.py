"""train_hypernetwork.py on the tiny model: the model never changes while the hypernetwork lowers the loss, A1111's
log folder (copies + .optim, previews sampled with the hypernetwork, hypernetwork_loss.csv, settings), resume
from a copy and its .optim continuing exactly, TensorBoard; config defaults, --check lines and bad settings."""
import csv
import datetime
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_hypernetwork
from library.config.loading import ConfigError, config_to_toml
from library.models.builtin import build_builtin
from library.networks.hypernetwork import Hypernetwork, attach, load_hypernetwork, unet_widths
from library.recipes.hypernetwork import RECIPE as HYPERNETWORK
from library.recipes.run import read_config
from library.sampling.preview import generate
from library.sampling.prompt_file import SampleSpec
from tests.helpers import SAMPLES, training_set_loss

TODAY = datetime.date.today().isoformat()


def config_text(tmp: Path, extra: str = "") -> Path:
    dataset = tmp / "train"
    if not dataset.exists():
        shutil.copytree(SAMPLES, dataset)
    path = tmp / "run.toml"
    path.write_text(f"""
[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{dataset.as_posix()}"
resolution = 64
[hypernetwork]
name = "kilnstyle"
activation_func = "relu"
weight_initialization = "XavierNormal"
learn_rate = "0.002:10, 0.001"
latent_sampling_method = "deterministic"
[train]
max_steps = 30
batch_size = 3
seed = 7
[save]
output_dir = "{(tmp / 'out').as_posix()}"
[logging]
log_dir = "{(tmp / 'logs').as_posix()}"
[hypernetwork_log]
save_hypernetwork_every = 15
create_image_every = 15
preview_prompt = "a photo of a kiln pot"
preview_seed = 5
preview_steps = 2
write_csv_every = 1
{extra}""", encoding="utf-8")
    return path


def run(path: Path, *overrides: str) -> int:
    try:
        return train_hypernetwork.main([str(path), *overrides])
    except SystemExit as exit:  # a one-line refusal before the model loads
        return exit.code


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def loss_with(network: Hypernetwork | None) -> float:
    parts = build_builtin("tiny-sd15")
    if network is not None:
        attach(parts, network.eval())
    return training_set_loss(parts, SAMPLES, lambda caption: f"a photo of a {caption}", latent_mean=True)


def test_trains_lowers_the_loss_keeps_the_model_and_writes_a1111s_folder(tmp_path, monkeypatch):
    parts = build_builtin("tiny-sd15")
    before = {name: module.state_dict() for name, module in (("unet", parts.unet), ("te", parts.text_encoder))}
    before = {name: {k: v.clone() for k, v in state.items()} for name, state in before.items()}
    monkeypatch.setattr("library.models.loading.load_model", lambda *args, **kwargs: parts)
    # with dropout, so the previews below also show that they sample with the network in eval mode
    assert run(config_text(tmp_path), "hypernetwork.use_dropout=true", "hypernetwork.dropout_structure=[0, 0.1, 0]") == 0

    for name, module in (("unet", parts.unet), ("te", parts.text_encoder)):  # the model never changes
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in before[name].items())
    final = load_hypernetwork(tmp_path / "out" / "kilnstyle.pt")
    assert final.step == 30 and final.name == "kilnstyle" and final.widths == [32, 64]
    start = build_builtin("tiny-sd15")
    initial = Hypernetwork(final.spec, unet_widths(start)).initialise(torch.Generator().manual_seed(7))
    assert loss_with(final) < loss_with(initial) * 0.995, "the hypernetwork did not learn"

    folder = tmp_path / "logs" / TODAY / "kilnstyle"
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    settings = [name for name in names if name.startswith("settings-")]
    assert len(settings) == 1 and json.loads((folder / settings[0]).read_text())["layer_structure"] == [1, 2, 1]
    names.remove(settings[0])
    assert names == ["hypernetwork_loss.csv", "hypernetworks/kilnstyle-15.pt", "hypernetworks/kilnstyle-15.pt.optim",
                     "hypernetworks/kilnstyle-30.pt", "hypernetworks/kilnstyle-30.pt.optim",
                     "images/kilnstyle-15.png", "images/kilnstyle-30.png"]
    copy = torch.load(folder / "hypernetworks" / "kilnstyle-15.pt", weights_only=True)
    assert copy["step"] == 15 and copy["name"] == "kilnstyle" and copy["activation_func"] == "relu"
    rows = read_csv(folder / "hypernetwork_loss.csv")
    assert list(rows[0]) == ["step", "epoch", "epoch_step", "loss", "learn_rate"]
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert [float(r["learn_rate"]) for r in rows] == [0.002] * 10 + [0.001] * 20
    assert list(tmp_path.glob("logs/kilnstyle-*/events.out.tfevents.*"))  # TensorBoard scalars

    # the preview at step 15 is the model with that step's hypernetwork applied (and differs without it)
    spec = SampleSpec("a photo of a kiln pot", "", 64, 64, 2, 7.0, 5)
    fresh = build_builtin("tiny-sd15")
    plain = np.asarray(generate(fresh, spec))
    attach(fresh, load_hypernetwork(folder / "hypernetworks" / "kilnstyle-15.pt"))
    with Image.open(folder / "images" / "kilnstyle-15.png") as preview:
        assert np.array_equal(np.asarray(preview.convert("RGB")), np.asarray(generate(fresh, spec)))
        assert not np.array_equal(np.asarray(preview.convert("RGB")), plain)


def test_resume_from_a_copy_and_its_optim_continues_exactly(tmp_path, capsys):
    args = ("train.max_steps=6", "hypernetwork_log.save_hypernetwork_every=3", "hypernetwork_log.create_image_every=0",
            "hypernetwork.use_dropout=true", "hypernetwork.dropout_structure=[0, 0.2, 0]", "train.batch_size=2")
    path = config_text(tmp_path)
    assert run(path, *args) == 0
    reference = load_hypernetwork(tmp_path / "out" / "kilnstyle.pt")
    copies = tmp_path / "logs" / TODAY / "kilnstyle" / "hypernetworks"
    full_rows = read_csv(copies.parent / "hypernetwork_loss.csv")

    resumed = (f"hypernetwork.resume={(copies / 'kilnstyle-3.pt').as_posix()}",
               f"save.output_dir={(tmp_path / 'b').as_posix()}", f"logging.log_dir={(tmp_path / 'b-logs').as_posix()}")
    capsys.readouterr()
    assert run(path, *args, *resumed) == 0
    assert "loaded the optimizer state" in capsys.readouterr().out
    continued = load_hypernetwork(tmp_path / "b" / "kilnstyle.pt")
    assert continued.step == 6
    for a, b in zip(continued.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    rows = read_csv(tmp_path / "b-logs" / TODAY / "kilnstyle" / "hypernetwork_loss.csv")
    assert [r["step"] for r in rows] == ["4", "5", "6"]
    assert [float(r["loss"]) for r in rows] == pytest.approx([float(r["loss"]) for r in full_rows[3:]], abs=1e-5)

    shutil.copy(copies / "kilnstyle-6.pt.optim", copies / "kilnstyle-3.pt.optim")  # another file's state
    assert run(path, *args, *resumed) == 0
    assert "saved for another file" in capsys.readouterr().out

    done = (f"hypernetwork.resume={(copies / 'kilnstyle-6.pt').as_posix()}", f"save.output_dir={(tmp_path / 'c').as_posix()}")
    assert run(path, *args, *done) == 0
    assert "already trained for 6 steps" in capsys.readouterr().out
    assert run(path, *args, *done, "hypernetwork.activation_func=tanh", "--check") == 2
    assert "a continued hypernetwork keeps its file's structure" in capsys.readouterr().err


MINIMAL = """
[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{train}"
[train]
max_steps = 10
[hypernetwork]
name = "my style"
"""


def problems(tmp_path: Path, extra: str = "", overrides=()) -> list[str]:
    (tmp_path / "train" / "1_x").mkdir(parents=True, exist_ok=True)
    path = tmp_path / "run.toml"
    path.write_text(MINIMAL.replace("{train}", (tmp_path / "train").as_posix()) + extra, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_config(path, list(overrides), HYPERNETWORK)
    return info.value.problems


def test_defaults_are_a1111s_train_tab_and_round_trip(tmp_path):
    (tmp_path / "train" / "1_x").mkdir(parents=True)
    path = tmp_path / "run.toml"
    path.write_text(MINIMAL.replace("{train}", (tmp_path / "train").as_posix()), encoding="utf-8")
    config = read_config(path, [], HYPERNETWORK)
    hn, opt = config.hypernetwork, config.optimizer
    assert (opt.lr, opt.max_grad_norm, opt.args, config.save.precision, config.save.name) == \
        (0.00001, 0.0, {}, "fp32", "my style")  # torch's AdamW as A1111 builds it: weight decay 0.01
    assert (hn.layer_structure, hn.activation_func, hn.weight_initialization, hn.template) == \
        ([1, 2, 1], "linear", "Normal", "hypernetwork")
    assert config.hypernetwork_log.save_hypernetwork_every == 500 and config.hypernetwork_log.create_image_every == 500
    assert hn.spec().dropout_structure == (0, 0, 0) and not hn.spec().activate_output
    again = tmp_path / "again.toml"
    again.write_text(config_to_toml(config), encoding="utf-8")
    assert read_config(again, [], HYPERNETWORK) == config


def test_bad_structure_settings_are_reported_together_naming_keys(tmp_path):
    found = problems(tmp_path, 'layer_structure = [2, 2, 1]\nactivation_func = "relu7"\n'
                               'weight_initialization = "Uniform"\ndropout_structure = [0, 0.3]\n')
    text = "\n".join(found)
    for key in ("hypernetwork.layer_structure", "hypernetwork.activation_func", "hypernetwork.weight_initialization",
                "hypernetwork.dropout_structure"):
        assert key in text, text
    assert "must start and end with 1" in text and "did you mean" not in text
    assert any("use_dropout = false" in p for p in problems(tmp_path, "dropout_structure = [0, 0.3, 0]\n"))
    assert any("hypernetwork.shuffle_tags" in p for p in problems(tmp_path, overrides=["dataset.shuffle_caption=true"]))


def test_check_describes_the_network_for_this_model(tmp_path, capsys):
    path = config_text(tmp_path)
    assert run(path, "--check", "hypernetwork.is_layer_norm=true") == 0
    out = capsys.readouterr().out
    assert "hypernetwork: layer structure [1, 2, 1], activation relu, init XavierNormal, layer norm; widths 32, 64" \
        in out
    assert "ComfyUI adds the activation after the last layer too" in out
    assert run(path, "--check", "hypernetwork.enable_sizes=[32, 768]") == 2
    assert "768 is no context width of this SD 1.x model" in capsys.readouterr().err


def test_queues_pick_the_script_and_gradient_checkpointing_still_trains(tmp_path):
    from library.batch.entries import plan_entries

    path = config_text(tmp_path)  # no `trainer` key: the [hypernetwork] section names it
    entry = plan_entries([str(path)], [], resume=False)[0]
    assert (entry.trainer, entry.script.name, entry.problem) == ("hypernetwork", "train_hypernetwork.py", "")
    assert entry.summary_file == tmp_path / "out" / "kilnstyle.run.json"
    assert run(path, "train.max_steps=2", "train.gradient_checkpointing=true", "hypernetwork_log.create_image_every=0",
               "hypernetwork_log.save_hypernetwork_every=0") == 0
    trained = load_hypernetwork(tmp_path / "out" / "kilnstyle.pt")
    initial = Hypernetwork(trained.spec, trained.widths).initialise(torch.Generator().manual_seed(7))
    assert not torch.equal(trained.pair(32)[0].linear[0].weight, initial.pair(32)[0].linear[0].weight)
    assert json.loads(entry.summary_file.read_text())["status"] == "finished"
