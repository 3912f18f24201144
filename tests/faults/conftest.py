"""Shared set-up of the fault-injection suite: one tiny LoRA run (8 steps, a save and a state every 2 steps,
keep_last = 1, so saves and pruning happen mid-run) and its uninterrupted result."""
from __future__ import annotations

from pathlib import Path

import pytest

import train_lora
from tests.faults.runner import run_child
from tests.helpers import write_run_config

RUN = """[train]
max_steps = 8
batch_size = 1
seed = 3
[save]
output_dir = "{tmp}/out"
name = "t"
every_n_steps = 2
keep_last = 1
save_state = true
precision = "fp32"
[network]
rank = 2
"""


def lora_run(tmp: Path, body: str = RUN) -> Path:
    return write_run_config(tmp, body)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """(final tensors, the fault points an uninterrupted run reaches, in order) of the RUN config."""
    from tests.faults.runner import final_tensors

    tmp = tmp_path_factory.mktemp("reference")
    trace = tmp / "trace.txt"
    result = run_child(train_lora.main, [str(lora_run(tmp))], {"KILN_FAULTS": "none:1=kill",
                                                              "KILN_FAULTS_TRACE": str(trace)})
    assert result.code == 0, result.output[-3000:]
    points = [line for line in trace.read_text().split() if not line.startswith("loss:")]
    return final_tensors(tmp / "out"), points
