"""library/host_memory.py: huge pages are asked for before torch loads (the user's setting stands), glibc's mmap
threshold is fixed only for CPU runs with huge pages, and a run launched as users launch it says so and trains
exactly what it trains without them. Anything that calls mallopt runs in a child process, so the test process's
own allocator is left as it was."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from library.host_memory import (HUGE_PAGES_VARIABLE, THRESHOLD_VARIABLE, kernel_gives_huge_pages,
                                 request_huge_pages, tune_host_allocator)
from tests.helpers import write_run_config

REPO = Path(__file__).resolve().parents[1]
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the allocator settings are for Linux with glibc")


def run_python(code: str, env: dict[str, str], *args: str) -> str:
    """`python -c code` (or, with args, `python code args...`) in a fresh process; its stdout."""
    environment = {k: v for k, v in os.environ.items() if k not in (HUGE_PAGES_VARIABLE, THRESHOLD_VARIABLE)}
    environment.update(env)
    command = [sys.executable, code, *args] if args else [sys.executable, "-c", code]
    done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@needs_glibc
def test_huge_pages_are_asked_for_before_torch_loads_and_the_users_setting_stands(monkeypatch):
    code = ("import os; from library.host_memory import request_huge_pages; request_huge_pages(); "
            f"print(os.environ.get('{HUGE_PAGES_VARIABLE}'))")
    assert run_python(code, {}).strip() == "1"
    assert run_python(code, {HUGE_PAGES_VARIABLE: "0"}).strip() == "0"
    monkeypatch.delenv(HUGE_PAGES_VARIABLE, raising=False)
    request_huge_pages()  # torch is loaded in this process: too late to ask, so nothing is set
    assert HUGE_PAGES_VARIABLE not in os.environ


@needs_glibc
def test_the_fixed_threshold_maps_blocks_of_a_mib_and_more_that_glibc_would_keep_in_its_heap(tmp_path):
    """A mapped block is unmapped when freed; one in the heap stays resident there (glibc raises its own threshold
    up to 32 MiB as mapped blocks are freed, which is what left half a GiB of freed activations in the heap)."""
    kernel = tmp_path / "enabled"
    kernel.write_text("always [madvise] never\n")
    code = f"""
import ctypes
from pathlib import Path
from library.host_memory import tune_host_allocator
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None); libc.mallinfo2.restype = Info; libc.malloc.restype = ctypes.c_void_p
kept = []
def new_block_of_1_5_mib_is_mapped():
    before = libc.mallinfo2().hblkhd
    kept.append(libc.malloc(3 << 19))  # kept, so the next one cannot reuse its place
    return libc.mallinfo2().hblkhd > before
libc.free(ctypes.c_void_p(libc.malloc(8 << 20)))  # glibc raises its threshold past this freed mapped block
print(new_block_of_1_5_mib_is_mapped())
print(tune_host_allocator("cpu", Path({str(kernel)!r})))
print(new_block_of_1_5_mib_is_mapped())
"""
    before, line, after = run_python(code, {HUGE_PAGES_VARIABLE: "1"}).splitlines()
    assert (before, after) == ("False", "True")
    assert "glibc's mmap threshold fixed at 1 MiB" in line and f"{HUGE_PAGES_VARIABLE}=0" in line


@needs_glibc
def test_nothing_is_changed_off_the_cpu_without_huge_pages_or_against_the_users_setting(tmp_path, monkeypatch):
    never, madvise = tmp_path / "never", tmp_path / "madvise"
    never.write_text("always madvise [never]\n")
    madvise.write_text("always [madvise] never\n")
    assert not kernel_gives_huge_pages(never) and kernel_gives_huge_pages(madvise)
    assert not kernel_gives_huge_pages(tmp_path / "missing")
    monkeypatch.setenv(HUGE_PAGES_VARIABLE, "1")
    assert tune_host_allocator("cuda", madvise) is None
    assert tune_host_allocator("cpu", never) is None  # a fixed threshold without huge pages costs page faults
    monkeypatch.setenv(THRESHOLD_VARIABLE, "262144")
    assert tune_host_allocator("cpu", madvise) == ("host memory: huge pages for PyTorch's CPU blocks of 2 MB and "
                                                   f"more; glibc's mmap threshold 262144 from {THRESHOLD_VARIABLE}")
    monkeypatch.setenv(HUGE_PAGES_VARIABLE, "0")
    assert tune_host_allocator("cpu", madvise) == f"host memory: allocator defaults ({HUGE_PAGES_VARIABLE}=0 in the environment)"


@needs_glibc
def test_train_lora_launched_as_users_launch_it_says_what_it_set_and_trains_the_same_bits(tmp_path):
    body = "[network]\nrank = 4\nalpha = 4\n[train]\nmax_steps = 3\nbatch_size = 2\nseed = 3\n"
    config = str(write_run_config(tmp_path, body))
    outputs, results = [], []
    for env in ({}, {HUGE_PAGES_VARIABLE: "0"}):
        outputs.append(run_python(str(REPO / "train_lora.py"), env, config, "save.overwrite=true"))
        results.append(load_file(str(tmp_path / "out" / "t.safetensors")))
    said = [[line for line in output.splitlines() if line.startswith("host memory:")] for output in outputs]
    if kernel_gives_huge_pages():
        assert len(said[0]) == 1 and "mmap threshold fixed at 1 MiB" in said[0][0], outputs[0][-3000:]
    else:
        assert said[0] == [], outputs[0][-3000:]
    assert said[1] == [f"host memory: allocator defaults ({HUGE_PAGES_VARIABLE}=0 in the environment)"]
    assert results[0].keys() == results[1].keys()
    assert all(results[0][k].equal(results[1][k]) for k in results[1])
