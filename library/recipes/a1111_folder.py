"""A1111's Train-tab log folder, shared by textual inversion (a1111_log.py) and hypernetworks: under
<logging.log_dir>/<YYYY-MM-DD>/<name>/ copies of what trains every N steps (the subclass writes them, with their
`.optim`), preview images images/<name>-<step>.png, the loss CSV and the settings-at-start file. <step> is the
number of optimizer steps done."""
from __future__ import annotations

import csv
import datetime
import json
from pathlib import Path
from typing import Callable

from PIL import Image

from library.atomic import write_text_atomically
from library.data.batches import Batch, hash_ints
from library.registry import canonical_optimizer_name
from library.sampling.preview import generate, save_sample
from library.sampling.prompt_file import SampleSpec
from library.training.hooks import TrainerHooks
from library.training.plan import TrainingPlan
from library.training.trainer import LoopParts, Trainer


class A1111LogFolder(TrainerHooks):
    """The shared part. `config`: the run's; `prompts`: the section with A1111's prompt keys (template,
    learn_rate, latent_sampling_method); `log`: the section with create_image_every, write_csv_every and
    preview_*; `prompt_transform` spells out names in preview prompts (multi-vector embeddings)."""

    csv_name = ""
    copy_every_key = ""  # the log section's key for copies, e.g. "save_embedding_every"
    writes_outputs = True  # data-parallel: the main process alone writes them

    def __init__(self, config, name: str, prompts, log, plan: TrainingPlan, trainable,
                 prompt_transform: Callable[[str], str] | None = None):
        self.config = config
        self.name = name
        self.prompts = prompts
        self.log = log
        self.plan = plan
        self.trainable = trainable
        self.prompt_transform = prompt_transform or (lambda text: text)
        self.folder = Path(config.logging.log_dir) / datetime.date.today().isoformat() / name
        self.optimizer_name = canonical_optimizer_name(config.optimizer.name)
        self.needs_vae = bool(log.create_image_every)  # its previews decode with the VAE

    # -- every step
    def after_step(self, trainer: Trainer, loop: LoopParts, loss: float, lrs: dict[str, float], batch: Batch) -> None:
        step, log = trainer.progress.global_step, self.log
        if log.write_csv_every and step % log.write_csv_every == 0:
            self.write_csv(step, loss, next(iter(lrs.values())))
        every = getattr(log, self.copy_every_key)
        if every and step % every == 0:
            self.save_copy(step, loop)
        if log.create_image_every and step % log.create_image_every == 0:
            self.preview(step, batch)

    def save_copy(self, step: int, loop: LoopParts) -> Path:
        raise NotImplementedError

    def preview(self, step: int, batch: Batch) -> None:
        self.render_preview(step, batch)

    def write_csv(self, step: int, loss: float, lr: float) -> None:
        """One row of A1111's loss CSV. Appended (not rewritten) so a resumed run continues the file."""
        path = self.folder / self.csv_name
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        per_epoch = self.plan.steps_per_epoch
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", "epoch", "epoch_step", "loss", "learn_rate"])
            # epoch counts from 0 and epoch_step from 1 within it, as in A1111's CSVs
            writer.writerow([step, (step - 1) // per_epoch, (step - 1) % per_epoch + 1, f"{loss:.7f}", lr])

    def preview_spec(self, step: int, batch: Batch) -> SampleSpec:
        log, train = self.log, self.config.train
        prompt = self.prompt_transform(log.preview_prompt) if log.preview_prompt else batch.captions[0]
        seed = log.preview_seed if log.preview_seed >= 0 else hash_ints(train.seed, step, 8) % 2**32
        size = self.config.dataset.resolution
        return SampleSpec(prompt, self.prompt_transform(log.preview_negative_prompt), log.preview_width or size,
                          log.preview_height or size, log.preview_steps, log.preview_cfg_scale, seed)

    def render_preview(self, step: int, batch: Batch) -> tuple[Image.Image, SampleSpec]:
        """images/<name>-<step>.png, sampled from the model as it trains (whatever the trainable applies)."""
        spec = self.preview_spec(step, batch)
        image = generate(self.trainable.parts, spec, self.config.model.clip_skip, self.config.train.max_token_length)
        save_sample(image, self.folder / "images" / f"{self.name}-{step}.png", spec)
        return image, spec

    def settings(self, trainer: Trainer) -> dict:
        """A1111's settings-at-start keys every trainer shares; subclasses add their own."""
        config, prompts = self.config, self.prompts
        return {
            "datetime": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
            "model_name": self.trainable.checkpoint_name, "model_hash": self.trainable.checkpoint_hash,
            "initial_step": trainer.progress.global_step, "num_of_dataset_images": len(trainer.data.items),
            "learn_rate": prompts.learn_rate or str(config.optimizer.lr), "batch_size": config.train.batch_size,
            "gradient_step": config.train.gradient_accumulation_steps,
            "clip_grad_mode": "norm" if config.optimizer.max_grad_norm else None,
            "clip_grad_value": config.optimizer.max_grad_norm or None, "data_root": config.dataset.train_dir,
            "log_directory": str(self.folder), "training_width": config.dataset.resolution,
            "training_height": config.dataset.resolution, "steps": trainer.plan.total_steps,
            "create_image_every": self.log.create_image_every, "template_file": str(prompts.template),
            "latent_sampling_method": prompts.latent_sampling_method}

    def before_train(self, trainer: Trainer, loop: LoopParts) -> None:
        """A1111's "settings at start" file, settings-<date>_<time>.json, with A1111's keys."""
        now = datetime.datetime.now()
        path = self.folder / f"settings-{now.strftime('%Y-%m-%d_%H-%M-%S')}.json"
        write_text_atomically(path, json.dumps(self.settings(trainer), indent=2) + "\n")
        print(f"training settings: {path}")
