"""The shared loop on its own: events reach hooks in order, saves follow the cadence, a start point continues
the LR schedule where a full run would be, and gradient accumulation counts optimizer steps."""
import torch

from library.models.builtin import build_builtin
from library.recipes.lora import RECIPE as LORA
from library.training.checkpoints import Progress
from library.training.hooks import TrainerHooks
from library.training.trainable import StartPoint
from library.training.trainer import Trainer
from tests.helpers import resolved_run

BODY = "[network]\nrank = 2\nalpha = 2\n[optimizer]\nscheduler = \"cosine\"\n"


class Recorder(TrainerHooks):
    def __init__(self):
        self.events: list[tuple] = []

    def before_train(self, trainer, loop):
        self.events.append(("before_train", trainer.progress.global_step))

    def after_step(self, trainer, loop, loss, lrs, batch):
        self.events.append(("step", trainer.progress.global_step, lrs["unet"]))

    def after_epoch(self, trainer, loop, epoch):
        self.events.append(("epoch", epoch, trainer.progress.global_step))

    def after_save(self, trainer, loop, artifact):
        self.events.append(("save", artifact.name))

    def after_train(self, trainer, loop, final):
        self.events.append(("train_end", final.name))


def train(tmp_path, overrides=(), start=None):
    _, run = resolved_run(LORA, tmp_path, BODY, overrides)
    parts = build_builtin("tiny-sd15")
    built = LORA.build(parts, run)
    recorder = Recorder()
    Trainer(run, parts, built.trainable, recorder, start).train()
    return run, recorder.events


def test_events_reach_hooks_in_order_and_saves_follow_the_cadence(tmp_path):
    run, events = train(tmp_path, ("train.epochs=2", "save.every_n_epochs=1"))
    per_epoch = run.plan.steps_per_epoch
    assert events[0] == ("before_train", 0)
    steps = [e[1] for e in events if e[0] == "step"]
    assert steps == list(range(1, 2 * per_epoch + 1))
    assert [e for e in events if e[0] == "epoch"] == [("epoch", 1, per_epoch), ("epoch", 2, 2 * per_epoch)]
    saves = [e[1] for e in events if e[0] == "save"]
    assert saves == ["t-000001.safetensors", "t.safetensors"]  # the last epoch's file is the final one
    assert events[-1] == ("train_end", "t.safetensors")
    first_save = events.index(("save", "t-000001.safetensors"))
    assert events[first_save - 1] == ("epoch", 1, per_epoch)  # an epoch save follows its epoch's end


def test_start_point_continues_the_schedule_where_a_full_run_would_be(tmp_path):
    _, full = train(tmp_path / "full", ("train.max_steps=8",))
    _, late = train(tmp_path / "late", ("train.max_steps=8",), StartPoint(Progress(5, 0, 5), None))
    full_lrs = {e[1]: e[2] for e in full if e[0] == "step"}
    late_lrs = {e[1]: e[2] for e in late if e[0] == "step"}
    assert sorted(late_lrs) == [6, 7, 8]
    assert all(abs(late_lrs[s] - full_lrs[s]) < 1e-12 for s in late_lrs)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    run, events = train(tmp_path, ("train.epochs=1", "train.gradient_accumulation_steps=4"))
    assert run.plan.steps_per_epoch == -(-run.plan.batches_per_epoch // 4)
    assert [e[1] for e in events if e[0] == "step"] == list(range(1, run.plan.steps_per_epoch + 1))


def test_frozen_weights_in_the_compute_dtype_trained_ones_in_fp32(tmp_path):
    _, run = resolved_run(LORA, tmp_path, BODY, ("train.mixed_precision=bf16", "train.max_steps=1"))
    parts = build_builtin("tiny-sd15")
    built = LORA.build(parts, run)
    Trainer(run, parts, built.trainable).train()
    trained = {id(p) for g in built.trainable.param_groups() for p in g["params"]}
    for module in (parts.unet, parts.text_encoder):
        for param in module.parameters():
            assert param.dtype == (torch.float32 if id(param) in trained else torch.bfloat16)
