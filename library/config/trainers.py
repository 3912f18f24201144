"""Which trainer a config is for: its top-level `trainer` key, or else the sections it has. Pure."""
from __future__ import annotations

from typing import Literal

TrainerName = Literal["lora", "textual_inversion", "dreambooth", "hypernetwork", "embedding_finetune"]

# trainer → the script that runs it (what a refusal and the run queue name)
TRAINER_SCRIPTS: dict[str, str] = {"lora": "train_lora.py", "textual_inversion": "train_textual_inversion.py",
                                   "dreambooth": "train_dreambooth.py", "hypernetwork": "train_hypernetwork.py",
                                   "embedding_finetune": "train_embedding_finetune.py"}

# a section only one trainer has names it when the config has no `trainer` key
_SECTION_TRAINERS = {"embedding": "textual_inversion", "ti_log": "textual_inversion", "dreambooth": "dreambooth",
                     "hypernetwork": "hypernetwork", "hypernetwork_log": "hypernetwork",
                     "embedding_finetune": "embedding_finetune", "network": "lora"}


def infer_trainer(data: dict) -> str:
    """The trainer of raw config data: `trainer = "..."` when set (even if unknown: the trainer's own check
    then says so), else [embedding] → textual_inversion, [dreambooth] → dreambooth, [hypernetwork] →
    hypernetwork, [embedding_finetune] → embedding_finetune, anything else → lora."""
    named = data.get("trainer")
    if isinstance(named, str) and named:
        return named
    for section, trainer in _SECTION_TRAINERS.items():
        if section in data:
            return trainer
    return "lora"


def wrong_trainer_message(named: str, expected: str) -> str:
    """The one line a trainer answers a config for another trainer with."""
    script = TRAINER_SCRIPTS.get(named)
    if script is None:
        return (f"trainer = {named!r} is not a Kiln trainer; use one of: "
                + ", ".join(f'"{name}" ({TRAINER_SCRIPTS[name]})' for name in TRAINER_SCRIPTS))
    return (f"trainer = {named!r}: this config is for {script}, not {TRAINER_SCRIPTS[expected]}; "
            f"run: python {script} <config>")
