"""Ctrl-C (SIGINT), a second Ctrl-C while the first one's save runs, and SIGTERM (a cloud machine's preemption):
the run stops after its step, saves the result and a resumable state, prints the full command that continues
it — which, run as printed, ends bit for bit where the uninterrupted run ends."""
from __future__ import annotations

import json
import shlex

import pytest

import train_lora
import train_textual_inversion
from tests.faults.conftest import lora_run
from tests.faults.runner import assert_same, final_tensors, hidden_entries, run_child, unreadable_files
from tests.helpers import write_run_config


def continue_command(output: str) -> list[str]:
    """The arguments of the printed command that continues the run (after the python and script)."""
    line = output.split("continue with:\n", 1)[1].splitlines()[0].strip()
    words = shlex.split(line)
    assert words[1].endswith("train_lora.py"), line
    return words[2:]


@pytest.mark.parametrize("faults, code", [
    ("step:3=sigint", 130),
    ("step:3=sigterm", 143),
    ("step:3=sigint,state-write:2=sigint", 130),  # the second Ctrl-C arrives while the state is being written
], ids=["sigint", "sigterm", "sigint-twice"])
def test_a_stopped_run_continues_with_the_printed_command(faults, code, reference_run, tmp_path):
    reference = reference_run[0]
    config, out = lora_run(tmp_path), tmp_path / "out"
    stopped = run_child(train_lora.main, [str(config), "save.keep_last=0"], {"KILN_FAULTS": faults})
    assert stopped.code == code, stopped.output[-3000:]
    assert "Traceback" not in stopped.output and "KeyboardInterrupt" not in stopped.output
    if "twice" in faults or faults.count("sigint") > 1:
        assert "saving, please wait" in stopped.output
    assert (out / "t-step00000003.safetensors").is_file() and (out / "t-step00000003-state").is_dir()
    assert unreadable_files(out) == [] and hidden_entries(out) == []
    summary = json.loads((out / "t.run.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] == 3

    args = continue_command(stopped.output)
    assert args[-1] == f"save.resume={out / 't-step00000003-state'}" and "save.keep_last=0" in args
    resumed = run_child(train_lora.main, args)
    assert resumed.code == 0, resumed.output[-3000:]
    assert_same(reference, final_tensors(out))


TI_RUN = """[embedding]
name = "kilnpot"
init_text = "pot"
template = ["a photo of [name]"]
[train]
max_steps = 6
batch_size = 1
seed = 3
[optimizer]
lr = 0.05
[save]
output_dir = "{tmp}/out"
name = "kilnpot"
precision = "fp32"
[ti_log]
save_embedding_every = 0
create_image_every = 0
write_csv_every = 0
"""


def test_textual_inversion_stopped_saves_optim_and_an_a1111_resume_matches(tmp_path):
    """A1111's way of continuing — from the embedding and the .optim beside it — after a Ctrl-C."""
    import torch

    from library.networks.embeddings import load_embedding

    whole = write_run_config(tmp_path / "whole", TI_RUN)
    assert run_child(train_textual_inversion.main, [str(whole)]).code == 0
    expected = load_embedding(tmp_path / "whole" / "out" / "kilnpot.pt").vectors

    config = write_run_config(tmp_path / "cut", TI_RUN)
    out = tmp_path / "cut" / "out"
    stopped = run_child(train_textual_inversion.main, [str(config)], {"KILN_FAULTS": "step:3=sigint"})
    assert stopped.code == 130, stopped.output[-3000:]
    step_file = out / "kilnpot-step00000003.pt"
    assert step_file.is_file() and step_file.with_name(step_file.name + ".optim").is_file()

    resumed = run_child(train_textual_inversion.main, [str(config), f"embedding.resume={step_file}",
                                                        "save.name=continued"])
    assert resumed.code == 0, resumed.output[-3000:]
    assert "optimizer state" in resumed.output.lower() or ".optim" in resumed.output
    actual = load_embedding(out / "continued.pt").vectors
    assert torch.equal(expected, actual), (expected - actual).abs().max()


HN_RUN = """[hypernetwork]
name = "kilnstyle"
layer_structure = [1, 2, 1]
weight_initialization = "XavierNormal"
learn_rate = "0.001"
[train]
max_steps = 6
batch_size = 1
seed = 3
[save]
output_dir = "{tmp}/out"
precision = "fp32"
[hypernetwork_log]
save_hypernetwork_every = 0
create_image_every = 0
write_csv_every = 0
"""


def test_hypernetwork_stopped_saves_optim_and_a_resume_from_the_file_matches(tmp_path):
    """A hypernetwork continued A1111's way — from the file and the .optim beside it — after a Ctrl-C."""
    import torch

    import train_hypernetwork

    def tensors(path):
        data = torch.load(path, weights_only=True)
        return {(size, index, key): value for size, pair in data.items() if isinstance(size, int)
                for index, layers in enumerate(pair) for key, value in layers.items()}

    whole = write_run_config(tmp_path / "whole", HN_RUN)
    assert run_child(train_hypernetwork.main, [str(whole)]).code == 0
    expected = tensors(tmp_path / "whole" / "out" / "kilnstyle.pt")

    config = write_run_config(tmp_path / "cut", HN_RUN)
    out = tmp_path / "cut" / "out"
    stopped = run_child(train_hypernetwork.main, [str(config)], {"KILN_FAULTS": "step:3=sigint"})
    assert stopped.code == 130, stopped.output[-3000:]
    step_file = out / "kilnstyle-step00000003.pt"
    assert step_file.is_file() and step_file.with_name(step_file.name + ".optim").is_file()

    resumed = run_child(train_hypernetwork.main, [str(config), f"hypernetwork.resume={step_file}",
                                                   "save.name=continued"])
    assert resumed.code == 0, resumed.output[-3000:]
    actual = tensors(out / "continued.pt")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
