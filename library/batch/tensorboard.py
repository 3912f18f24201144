"""The TensorBoard launcher behind scripts/tensorboard.sh / .ps1: TensorBoard on a run's log folder, or on a
queue's folder (its summary.csv names every run's log folder, so runs that start later show up too), on
localhost and a free port."""
from __future__ import annotations

import argparse
import socket
from pathlib import Path

from library.batch.report import SUMMARY_NAME, read_log_dirs

DEFAULT_PORT = 6006


def logdir_args(folder: Path) -> list[str]:
    """TensorBoard's --logdir (or --logdir_spec for a queue whose runs log to several folders)."""
    summary = folder / SUMMARY_NAME
    dirs = read_log_dirs(summary) if summary.is_file() else []
    if not dirs:
        return ["--logdir", str(folder)]
    if len(dirs) == 1:
        return ["--logdir", str(dirs[0])]
    labels, spec = set(), []
    for index, path in enumerate(dirs, 1):
        label = path.name if path.name not in labels else f"{path.name}{index}"
        labels.add(label)
        spec.append(f"{label}:{path}")
    if any("," in str(path) for path in dirs):  # the spec is comma-separated: fall back to a common parent
        common = Path(*Path(dirs[0]).parts[:1])
        for part_count in range(len(dirs[0].parts), 0, -1):
            candidate = Path(*dirs[0].parts[:part_count])
            if all(candidate in (d, *d.parents) for d in dirs):
                common = candidate
                break
        return ["--logdir", str(common)]
    return ["--logdir_spec", ",".join(spec)]


def free_port(host: str, start: int = DEFAULT_PORT, tries: int = 50) -> int:
    """The first port from `start` that nothing listens on (TensorBoard's own default, 6006, when free)."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {start}-{start + tries - 1}; pass --port")


def tensorboard_argv(argv: list[str] | None) -> list[str]:
    """The arguments for TensorBoard's own main, from the launcher's."""
    parser = argparse.ArgumentParser(prog="tensorboard.sh", description="TensorBoard on a run's or a queue's "
                                     "log folder (localhost; the first free port from 6006)")
    parser.add_argument("folder", nargs="?", default="logs", help="a log folder, a run folder, or a queue folder "
                        "(logs/queue-...): default logs")
    parser.add_argument("--port", type=int, help="port (default: the first free one from 6006)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1 only)")
    args, rest = parser.parse_known_args(argv)
    folder = Path(args.folder)
    if not folder.exists():
        parser.error(f"{folder} does not exist (yet): pass a run's logging.log_dir or a queue folder")
    port = args.port or free_port(args.host)
    return ["tensorboard", *logdir_args(folder), "--host", args.host, "--port", str(port), *rest]
