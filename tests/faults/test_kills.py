"""SIGKILL — a power cut, an out-of-memory kill — at 20 seeded points of a run, inside saves (artifact and
state writes, their renames), between pruning a state and its artifact, and between steps. After each: every
visible file reads, the next run removes the hidden leftovers (and says so), and resuming from the newest
state (or starting again when none was written) ends bit for bit where the uninterrupted run ends."""
from __future__ import annotations

import random

import pytest

import train_lora
from tests.faults.conftest import lora_run
from tests.faults.runner import (assert_same, final_tensors, hidden_entries, latest_state, run_child,
                                 unreadable_files)

KILLS = 20
SEED = 20261130


def chosen_points(points: list[str]) -> list[str]:
    """20 seeded points, with every kind of point among them."""
    assert len(points) >= KILLS, points
    rng = random.Random(SEED)
    kinds = sorted({p.split(":")[0] for p in points})
    first = [rng.choice([p for p in points if p.startswith(kind + ":")]) for kind in kinds]
    rest = rng.sample([p for p in points if p not in first], KILLS - len(first))
    return first + rest


def test_the_run_passes_every_kind_of_fault_point(reference_run):
    kinds = {p.split(":")[0] for p in reference_run[1]}
    assert {"artifact-write", "artifact-before-rename", "state-write", "state-before-rename", "prune-between",
            "step"} <= kinds


@pytest.mark.parametrize("index", range(KILLS))
def test_kill_then_resume_ends_bit_exact(index, reference_run, tmp_path):
    reference, points = reference_run
    point = chosen_points(points)[index]
    config, out = lora_run(tmp_path), tmp_path / "out"
    killed = run_child(train_lora.main, [str(config)], {"KILN_FAULTS": f"{point}=kill"})
    assert killed.killed, f"{point} was not reached: {killed.output[-2000:]}"
    assert unreadable_files(out) == [], point
    leftovers = hidden_entries(out)

    state = latest_state(out)
    again = [str(config), f"save.resume={state}"] if state else [str(config), "save.overwrite=true"]
    resumed = run_child(train_lora.main, again)
    assert resumed.code == 0, f"{point}: {resumed.output[-3000:]}"
    if leftovers:
        assert f"removed {len(leftovers)} incomplete file(s)" in resumed.output, (point, leftovers)
    assert hidden_entries(out) == [], point
    assert unreadable_files(out) == [], point
    assert_same(reference, final_tensors(out))
