"""How this process was started: alone, or as one of several by `accelerate launch` (torchrun underneath),
torchrun itself or mpirun. Read from the environment those launchers set, before torch is imported, so the
plan, --check and the quiet non-main processes know it from the first line."""
from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

# the variables accelerate reads (accelerate.utils.get_cpu_distributed_information): torchrun's, then MPI's
_SIZE = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")
# what accelerate launch sets for the accelerate configs that shard the model instead of copying it
_SHARDED = (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP"),
            ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM"))
_LOCAL_RANK = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")


@dataclass(frozen=True)
class Launch:
    processes: int = 1  # the processes training together (all machines)
    rank: int = 0  # this one's number; 0 is the main process, the one that writes files and logs
    local_rank: int = 0  # its number on this machine (which GPU it takes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_int(env: Mapping[str, str], names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return default


def launch_info(env: Mapping[str, str] | None = None) -> Launch:
    """This process's place among the processes its launcher started (one process when none did)."""
    env = os.environ if env is None else env
    processes = max(_first_int(env, _SIZE, 1), 1)
    if processes == 1:
        return Launch()
    return Launch(processes, _first_int(env, _RANK, 0), _first_int(env, _LOCAL_RANK, 0))


def launch_problems(batch_size: int, device: str, env: Mapping[str, str] | None = None,
                    fused_backward_pass: bool = False, batch_coupled_noise: bool = False) -> list[str]:
    """What keeps the processes the launcher started (or meant to start) from training together."""
    env = os.environ if env is None else env
    launch = launch_info(env)
    problems = [f"the accelerate config selects {name}, which Kiln does not use: it trains data-parallel, a whole "
                "copy of the model in every process; choose multi-GPU in `accelerate config` (or launch with "
                "--multi_gpu)" for flag, name in _SHARDED if env.get(flag, "").lower() == "true"]
    if launch.processes == 1:
        # `accelerate launch --cpu --num_processes N` starts ONE process unless mpirun starts the others; it
        # leaves MASTER_ADDR set for them
        if env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and env.get("MASTER_ADDR"):
            problems.append("accelerate launch --cpu started one process (it starts several on the CPU only through "
                            "mpirun, --mpirun_hostfile): for N processes on this machine's CPU use `accelerate launch "
                            "--multi_gpu --num_processes N <script> ... train.device=cpu` (torchrun, gloo), or drop "
                            "--num_processes")
        return problems
    if batch_size % launch.processes:
        problems.append(f"train.batch_size = {batch_size} cannot be split evenly across {launch.processes} processes: "
                        f"it is the global batch (all processes together), so set a multiple of {launch.processes}, "
                        f"e.g. {launch.processes * max(1, round(batch_size / launch.processes))}")
    if device.startswith("cuda:"):
        problems.append(f"train.device = '{device}' names one GPU, but {launch.processes} processes were launched, each "
                        "on the GPU of its local rank: set train.device = 'cuda' (or 'auto') and choose the GPUs with "
                        "accelerate launch --gpu_ids (or CUDA_VISIBLE_DEVICES)")
    if device == "mps":
        problems.append(f"train.device = 'mps' trains in one process; {launch.processes} were launched: run the "
                        "script without accelerate launch")
    if batch_coupled_noise:
        problems.append("train.adaptive_noise_scale with train.multires_noise_iterations makes each sample's noise "
                        "depend on every latent of the batch (the pyramid noise is divided by the whole batch's std), "
                        f"which none of the {launch.processes} processes holds: turn one of them off for a "
                        "data-parallel run")
    if fused_backward_pass:
        problems.append(f"optimizer.fused_backward_pass steps each tensor during backward, before its gradient is "
                        f"summed over the {launch.processes} processes: set it to false for a data-parallel run")
    return problems


def quiet_unless_main(launch: Launch) -> None:
    """Every process but the main one trains silently: no printed lines, progress bars or warnings (the main
    process prints the run's output once). Errors that are not Kiln's expected ones still reach stderr."""
    if launch.is_main:
        return
    from functools import partialmethod

    import tqdm.std  # light; every bar (Kiln's, diffusers') is a tqdm.std.tqdm or a subclass of it

    sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - for the life of the process
    # tqdm reads its defaults (TQDM_DISABLE) when first imported, which may have happened already: change the
    # default itself
    tqdm.std.tqdm.__init__ = partialmethod(tqdm.std.tqdm.__init__, disable=True)
    warnings.simplefilter("ignore")
