"""The pieces of data-parallel training: how a batch is shared, draws that stay the whole batch's, gradients
summed over 2 real gloo processes, and which hooks the other processes keep."""
import datetime
import json
import socket
from pathlib import Path

import pytest
import torch

from library.data.sources import encode_latents
from library.models.builtin import build_builtin
from library.training import distributed
from library.training.distributed import Processes, Share
from library.training.hooks import CombinedHooks, TrainerHooks, hooks_for_process
from library.config.schema import TrainSection
from library.data.batches import Batch
from library.data.folders import ImageItem
from library.training.objective import Objective
from tests.faults.runner import start_child, wait_child


@pytest.mark.parametrize("total", [1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shares_cover_every_row_once_and_differ_by_at_most_one(total, count):
    shares = [Processes(count, rank).share(total) for rank in range(count)]
    rows = [row for share in shares for row in range(total)[share.rows]]
    assert rows == list(range(total))
    assert max(s.size for s in shares) - min(s.size for s in shares) <= 1
    assert all(s.total == total for s in shares)


def test_one_process_shares_nothing_and_communicates_nothing():
    alone = Processes()
    assert alone.share(5) == Share(0, 5, 5) and alone.share(5).whole and alone.is_main
    assert alone.seed(123) == 123  # the step's own seed: one-process runs draw what they always drew
    assert alone.loss_value(torch.tensor(1.5)) == 1.5 and alone.any(True) and not alone.any(False)
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.full((2,), 3.0)
    alone.sum_gradients([param])  # no process group exists: it would raise if it tried to communicate
    assert param.grad.tolist() == [3.0, 3.0]


# every noise and loss option; adaptive_noise_scale with multires noise couples the rows (refused: test_launch.py)
OPTIONS = [{}, {"noise_offset": 0.1, "noise_offset_random_strength": True, "multires_noise_iterations": 3,
               "ip_noise_gamma": 0.1, "min_timestep": 100, "max_timestep": 900, "loss_type": "huber",
               "min_snr_gamma": 5.0},
           {"noise_offset": 0.1, "adaptive_noise_scale": 0.05, "debiased_estimation_loss": True}]


@pytest.mark.parametrize("options", OPTIONS)
def test_noise_timesteps_and_loss_of_each_share_are_the_whole_batchs_rows(options):
    from diffusers import DDPMScheduler

    objective = Objective(TrainSection(max_steps=1, **options), 1.0, DDPMScheduler(num_train_timesteps=1000), False)
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prediction = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    items = [ImageItem(Path(f"{i}.png"), "c", False, 1, False, 0) for i in range(5)]
    batch = Batch(items, list(range(5)), ["c"] * 5, [False] * 5, sample_weights=(1.0, 2.0, 1.0, 0.5, 1.0))
    whole = objective.noised(latents, torch.Generator().manual_seed(9))
    whole_loss = objective.loss(prediction, latents, whole, batch)
    parts = []
    for share in (Share(0, 3, 5), Share(3, 5, 5)):
        part = objective.noised(latents[share.rows], torch.Generator().manual_seed(9), share)
        assert torch.equal(part.noise, whole.noise[share.rows]) and torch.equal(part.noisy, whole.noisy[share.rows])
        assert torch.equal(part.timesteps, whole.timesteps[share.rows])
        rows = batch.rows(share.rows)
        parts.append(objective.loss(prediction[share.rows], latents[share.rows], part, rows, None, share))
    assert torch.allclose(sum(parts), whole_loss, rtol=1e-6)  # the processes' losses add up to the batch's


def test_latents_drawn_for_a_share_are_the_whole_batchs_rows():
    vae = build_builtin("tiny-sd15").vae
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    whole = encode_latents(vae, pixels, torch.Generator().manual_seed(7))
    rows = encode_latents(vae, pixels[1:3], torch.Generator().manual_seed(7), first=1, whole=4)
    assert torch.allclose(rows, whole[1:3], atol=1e-5)


def _sum_in_process(argv: list[str]) -> int:
    """One of 2 gloo processes: sum gradients that only some processes have, in buckets of 4 elements."""
    import torch.distributed as dist

    rank, port, out = int(argv[0]), argv[1], Path(argv[2])
    # a short timeout: a collective the other process never joins fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    distributed._BUCKET_ELEMENTS = 4
    params = [torch.nn.Parameter(torch.zeros(size)) for size in (3, 2, 5, 1)]
    params[0].grad = torch.full((3,), rank + 1.0)  # both processes: 1 + 2
    if rank == 0:
        params[1].grad = torch.tensor([5.0, 6.0])  # only the main process (the other had no rows)
    params[2].grad = torch.arange(5.0) * (rank + 1)  # one bucket of its own: larger than 4 elements
    # params[3]: no process has a gradient (frozen): it must keep none
    Processes(2, rank).sum_gradients(params)
    grads = [None if p.grad is None else p.grad.tolist() for p in params]
    out.write_text(json.dumps({"grads": grads, "loss": Processes(2, rank).loss_value(torch.tensor(rank + 0.5)),
                               "stop": Processes(2, rank).any(rank == 1)}))
    dist.destroy_process_group()
    return 0


def test_gradients_are_summed_over_two_gloo_processes(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = [start_child(_sum_in_process, [str(rank), str(port), str(tmp_path / f"{rank}.json")], {},
                           tmp_path / f"{rank}.log") for rank in range(2)]
    results = [wait_child(pid, log) for pid, log in started]
    assert [r.code for r in results] == [0, 0], [r.output for r in results]
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["grads"] == [[3.0] * 3, [5.0, 6.0], [0.0, 3.0, 6.0, 9.0, 12.0], None]
        assert got["loss"] == 2.0 and got["stop"] is True  # a stop asked on process 1 only is seen by both


class _Writer(TrainerHooks):
    writes_outputs = True


class _Freezer(TrainerHooks):
    pass


def test_other_processes_keep_only_the_hooks_that_change_training():
    writer, freezer = _Writer(), _Freezer()
    combined = CombinedHooks(freezer, writer)
    assert hooks_for_process(combined, is_main=True) is combined
    assert hooks_for_process(combined, is_main=False).hooks == [freezer]
    assert hooks_for_process(writer, is_main=False) is None and hooks_for_process(freezer, False) is freezer
    from library.recipes.a1111_log import A1111Log
    from library.sampling.preview import SamplingHooks

    assert A1111Log.writes_outputs and SamplingHooks.writes_outputs


def test_no_process_group_means_one_process():
    assert distributed.current_processes().count == 1
