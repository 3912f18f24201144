"""Reading PyTorch pickles safely: only `torch.load(weights_only=True)`, and a one-line reason when a file is
refused — it holds pickled code, or it is damaged. Never PyTorch's own advice to retry with
`weights_only=False`, which would run the code just refused. Callers add what the user should do."""
from __future__ import annotations

import pickle
from pathlib import Path


class UnreadableTensorFile(ValueError):
    """A file that cannot be read as tensors; the message is one line naming it."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line.split(". ")[0] if len(line) > 100 else line  # torch's zip errors run on for several sentences


def load_weights_only(path: str | Path, mmap: bool = False):
    """torch.load(path, weights_only=True) on the CPU; UnreadableTensorFile naming the file and the reason."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise UnreadableTensorFile(f"{path} holds pickled Python objects besides tensors, and Kiln never "
                                       "unpickles those (a pickle can run arbitrary code)") from None
        raise UnreadableTensorFile(f"{path} is damaged ({first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many error types for a cut-short or corrupt file
        raise UnreadableTensorFile(f"{path} cannot be read ({first_line(exc)}); the file may be incomplete or "
                                   "damaged") from None
