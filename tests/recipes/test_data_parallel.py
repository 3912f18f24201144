"""Data-parallel training on 2 CPU processes (gloo), as `accelerate launch` runs it: the result equals a
1-process run with the same global batch, only the main process writes and prints, a stop request on any process
stops all of them after the same step, and the state they save resumes exactly on 2 processes."""
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_lora
from tests.faults.runner import start_child, wait_child
from tests.helpers import SAMPLES

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")

# 5 images × 1 repeat in batches of 2: every epoch's last batch has 1 row, so the second process has none in it,
# and gradient accumulation 2 makes that batch a step of its own
CONFIG = """[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{train}"
resolution = 64
cache_latents = "off"
flip_aug = true
[network]
rank = 4
alpha = 4
[optimizer]
name = "SGDNesterov"
lr = 0.5
[train]
epochs = 2
batch_size = 2
gradient_accumulation_steps = 2
noise_offset = 0.05
seed = 5
[save]
output_dir = "{out}"
name = "t"
precision = "fp32"
[logging]
log_dir = "{logs}"
"""


def five_images(tmp: Path) -> Path:
    folder = tmp / "train" / "1_kiln pot"
    folder.mkdir(parents=True)
    images = sorted(p for p in (SAMPLES / "10_kiln pot").iterdir() if p.suffix != ".txt")[:5]
    for image in images:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / f"{image.stem}.txt")
    return tmp / "train"


def write_config(tmp: Path, name: str, body: str = CONFIG) -> Path:
    train = tmp / "train" if (tmp / "train").exists() else five_images(tmp)
    path = tmp / f"{name}.toml"
    path.write_text(body.format(train=train.as_posix(), out=(tmp / name / "out").as_posix(),
                                logs=(tmp / name / "logs").as_posix()), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two(tmp: Path, argv: list[str], rank_env: dict[int, dict[str, str]] | None = None, main=train_lora.main) -> list:
    """A script's main on 2 forked processes, with the environment torchrun (accelerate launch) gives them."""
    port, started = free_port(), []
    for rank in range(2):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **(rank_env or {}).get(rank, {})}
        started.append(start_child(main, argv, env, tmp / f"rank{rank}-{len(list(tmp.glob('rank*')))}.log"))
    return [wait_child(pid, log) for pid, log in started]


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


# the noise, loss, augmentation and EMA options each draw per sample or sum over the batch: all stay exact
WITH_OPTIONS = CONFIG.replace("flip_aug = true", "flip_aug = true\ncolor_aug = true").replace(
    "noise_offset = 0.05", 'noise_offset = 0.05\nmultires_noise_iterations = 3\nip_noise_gamma = 0.1\n'
    'loss_type = "huber"\nmin_snr_gamma = 5.0').replace("[save]", "[ema]\nenabled = true\nupdate_interval = 1\n[save]")


def test_two_processes_train_what_one_process_trains_with_the_same_global_batch(tmp_path):
    one = write_config(tmp_path, "one", WITH_OPTIONS)
    assert train_lora.main([str(one)]) == 0
    two = write_config(tmp_path, "two", WITH_OPTIONS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                           "train_lora.py", str(two)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    plan_line = "processes         : data-parallel on 2 processes, each takes 1 of every batch of 2"
    assert done.stdout.count(plan_line) == 1, done.stdout
    assert done.stdout.count("saved ") == 1  # the other process prints nothing

    reference = load_file(str(tmp_path / "one" / "out" / "t.safetensors"))
    result = load_file(str(tmp_path / "two" / "out" / "t.safetensors"))
    start = {key: torch.zeros_like(value) if "lora_up" in key else value for key, value in reference.items()}
    assert largest_difference(reference, start) > 1e-3  # the run moved the weights (lora_up starts at zero)
    assert largest_difference(reference, result) < 1e-5
    assert sorted(p.name for p in (tmp_path / "two" / "out").iterdir()) == ["t.run.json", "t.safetensors"]
    assert len(list((tmp_path / "two" / "logs").iterdir())) == 1  # one TensorBoard run, the main process's
    summary = json.loads((tmp_path / "two" / "out" / "t.run.json").read_text())
    assert summary["processes"] == 2 and summary["step"] == summary["total_steps"] == 4


RESUMABLE = CONFIG.replace('name = "SGDNesterov"\nlr = 0.5', "lr = 2e-3").replace(
    "epochs = 2", 'max_steps = 4\nnan_policy = "skip"').replace('cache_latents = "off"', 'cache_latents = "memory"')


def test_a_stop_on_any_process_stops_all_after_the_same_step_and_the_state_resumes_exactly(tmp_path):
    whole = write_config(tmp_path, "whole", RESUMABLE)
    # the first batch's loss is NaN on process 1 only: both must skip it (train.nan_policy = "skip")
    finished = run_two(tmp_path, [str(whole)], {1: {"KILN_FAULTS": "loss:1=nan"}})
    assert [r.code for r in finished] == [0, 0], [r.output[-2000:] for r in finished]
    assert "step 1: the loss is NaN/inf, batch skipped" in finished[0].output

    cut = write_config(tmp_path, "cut", RESUMABLE)
    stopped = run_two(tmp_path, [str(cut)], {1: {"KILN_FAULTS": "loss:1=nan,step:2=sigterm"}})  # to process 1 only
    assert stopped[0].code == 130 and stopped[1].code == 143, [r.output[-2000:] for r in stopped]
    assert "stopped at step 2 of 4" in stopped[0].output and "continue with" in stopped[0].output
    assert stopped[1].output.strip() == "", stopped[1].output  # quiet: its stop is reported by the main process
    state = tmp_path / "cut" / "out" / "t-step00000002-state"
    progress = json.loads((state / "progress.json").read_text())
    assert progress["global_step"] == 2 and progress["processes"] == 2
    assert progress["nan_skipped"] == 1  # counted by the main process, whose own loss was finite
    summary = json.loads((tmp_path / "cut" / "out" / "t.run.json").read_text())
    assert summary["status"] == "interrupted"
    assert "accelerate launch --multi_gpu --num_processes 2" in summary["resume_command"]

    resumed = run_two(tmp_path, [str(cut), f"save.resume={state.as_posix()}"])
    assert [r.code for r in resumed] == [0, 0], [r.output[-2000:] for r in resumed]
    expected = load_file(str(tmp_path / "whole" / "out" / "t.safetensors"))
    assert largest_difference(expected, load_file(str(tmp_path / "cut" / "out" / "t.safetensors"))) == 0.0


TI = """[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{train}"
resolution = 64
cache_latents = "disk"
cache_dir = "{out}/../cache"
[embedding]
name = "kilnpot"
init_text = "pot"
vectors = 2
template = "[name], [filewords]"
learn_rate = "20"
latent_sampling_method = "random"
[optimizer]
name = "SGDNesterov"
[train]
max_steps = 3
batch_size = 2
seed = 5
[save]
output_dir = "{out}"
[logging]
log_dir = "{logs}"
[ti_log]
write_csv_every = 1
save_embedding_every = 0
create_image_every = 0
"""

DREAMBOOTH = """[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{train}"
resolution = 64
[dreambooth]
train_text_encoder = true
stop_text_encoder_training = 1
class_dir = "{out}/../class/1_pot"
class_prompt = "a pot"
num_class_images = 2
class_sampling_steps = 2
[optimizer]
name = "SGDNesterov"
lr = 0.05
[train]
max_steps = 2
batch_size = 2
seed = 5
[save]
output_dir = "{out}"
name = "t"
precision = "fp32"
[logging]
log_dir = "{logs}"
"""


def _embedding(folder: Path) -> dict:
    from library.networks.embeddings import load_embedding

    return {"vectors": load_embedding(folder / "kilnpot.pt").vectors}


@pytest.mark.parametrize("script, body, result", [
    ("train_textual_inversion", TI, _embedding),
    ("train_dreambooth", DREAMBOOTH, lambda folder: load_file(str(folder / "t.safetensors"))),
], ids=["textual inversion", "dreambooth"])
def test_textual_inversion_and_dreambooth_train_the_same_on_two_processes(tmp_path, script, body, result):
    main = importlib.import_module(script).main
    assert main([str(write_config(tmp_path, "one", body))]) == 0
    two = run_two(tmp_path, [str(write_config(tmp_path, "two", body))], main=main)
    assert [r.code for r in two] == [0, 0], [r.output[-2000:] for r in two]
    reference, shared = result(tmp_path / "one" / "out"), result(tmp_path / "two" / "out")
    assert largest_difference(reference, shared) < 1e-5
    if script == "train_dreambooth":  # each process generated one of the two class images
        assert len(list((tmp_path / "two" / "class" / "1_pot").glob("*.png"))) == 2
    else:  # the processes shared the disk cache's encoding; the A1111 log has a row per step, not per process
        assert len(list((tmp_path / "two" / "cache").rglob("*.safetensors"))) == 5
        (csv_file,) = (tmp_path / "two" / "logs").rglob("textual_inversion_loss.csv")
        assert len(csv_file.read_text().strip().splitlines()) == 1 + 3
