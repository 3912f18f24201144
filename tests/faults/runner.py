"""Running a training as a separate process that can be killed, cheaply: the child is forked from the test
process (torch and the libraries already imported), runs the real script's main, and its output goes to a
file. Faults are injected with KILN_FAULTS (library/faults.py)."""
from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from library.training.checkpoints import load_state, temporaries
from library.safe_load import load_weights_only

NAME = "t"


@dataclass
class ChildResult:
    code: int  # the exit code, or -N when signal N ended the process
    output: str

    @property
    def killed(self) -> bool:
        return self.code == -9


def run_child(main, argv: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> ChildResult:
    """main(argv) in a forked process with `env` added to its environment."""
    return wait_child(*start_child(main, argv, env, log))


def start_child(main, argv: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> tuple[int, Path]:
    """Fork a process that runs main(argv) with `env` added; (its pid, its output file) for wait_child."""
    log = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"kiln-child-{os.getpid()}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os.environ.update(env or {})
            from library import faults

            faults.reset()
            torch.set_num_threads(1)
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - report anything, then leave
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    return pid, log


def wait_child(pid: int, log: Path) -> ChildResult:
    """The result of a child start_child forked, once it ends."""
    _, status = os.waitpid(pid, 0)
    return ChildResult(os.waitstatus_to_exitcode(status), log.read_text(encoding="utf-8", errors="replace"))


def exit_code(main, argv: list[str]) -> int:
    """main(argv) in this process: its exit code, whether returned or raised as SystemExit."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def unreadable_files(folder: Path) -> list[str]:
    """Visible files and state folders under `folder` that another tool (or a resume) could not read."""
    bad = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        try:
            if path.is_dir() and path.name.endswith("-state"):
                load_state(path)
            elif path.suffix == ".safetensors" and "-state" not in path.parent.name:
                load_file(str(path))
            elif path.suffix in (".optim", ".pt") and "-state" not in path.parent.name:
                load_weights_only(path)
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except Exception as exc:  # noqa: BLE001 - any failure to read is what this looks for
            bad.append(f"{path}: {exc}")
    return bad


def hidden_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def latest_state(folder: Path) -> Path | None:
    states = sorted(folder.glob(f"{NAME}-step*-state")) if folder.is_dir() else []
    return states[-1] if states else None


def final_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / f"{NAME}.safetensors"))


def assert_same(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


__all__ = ["ChildResult", "run_child", "start_child", "wait_child", "exit_code", "unreadable_files", "hidden_entries", "latest_state", "final_tensors",
           "assert_same", "temporaries", "NAME"]
