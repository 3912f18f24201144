"""train_embedding_finetune.py on the tiny model: only the chosen tokens' rows change (bitwise, everything else
stays), the loss drops, the rows file applies through tools/merge_lora.py to the same model the trainer writes;
the whole-table mode keeps only rows that changed; config rules and refusals."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_embedding_finetune
from library.config.loading import ConfigError
from library.models.builtin import build_builtin
from library.models.clip_tokenizer import build_clip_tokenizer
from library.networks.merge import read_network_file
from library.networks.token_rows import apply_token_rows
from library.recipes.embedding_finetune import RECIPE as EMBEDDING_FINETUNE
from library.recipes.run import read_config
from tests.helpers import SAMPLES, training_set_loss

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import merge_lora  # noqa: E402

TABLE = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
KILN, POT = 44150, 5168  # CLIP's ids of "kiln</w>" and "pot</w>"


def config_text(tmp: Path, extra: str = "") -> Path:
    dataset = tmp / "train"
    if not dataset.exists():
        shutil.copytree(SAMPLES, dataset)
    path = tmp / "run.toml"
    path.write_text(f"""
[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{dataset.as_posix()}"
resolution = 64
[embedding_finetune]
tokens = ["kiln", "pot"]
[optimizer]
lr = 0.01
[train]
max_steps = 30
batch_size = 3
seed = 7
[save]
output_dir = "{(tmp / 'out').as_posix()}"
name = "rows"
[logging]
log_dir = "{(tmp / 'logs').as_posix()}"
{extra}""", encoding="utf-8")
    return path


def run(path: Path, *overrides: str) -> int:
    try:
        return train_embedding_finetune.main([str(path), *overrides])
    except SystemExit as exit:
        return exit.code


def loss_with(weights: dict | None) -> float:
    parts = build_builtin("tiny-sd15")
    if weights is not None:
        apply_token_rows(parts, weights)
    return training_set_loss(parts, SAMPLES)


def test_only_the_chosen_rows_change_and_the_file_merges_to_the_saved_model(tmp_path, monkeypatch):
    parts = build_builtin("tiny-sd15")
    before = {k: v.clone() for module in parts.networks() for k, v in module.state_dict().items()}
    loads = iter([parts])  # the training model; the whole model is then built from a fresh copy
    monkeypatch.setattr("library.models.loading.load_model",
                        lambda *a, **k: next(loads, None) or build_builtin("tiny-sd15"))
    assert run(config_text(tmp_path), "embedding_finetune.full_model=single_file",
               "embedding_finetune.full_model_precision=fp32") == 0
    after = {k: v for module in parts.networks() for k, v in module.state_dict().items()}
    # the hook trains; the model stays (the VAE, freed once latents are cached, is left out)
    assert [k for k, v in before.items() if not after[k].is_meta and not torch.equal(v, after[k])] == []

    weights, metadata = read_network_file(tmp_path / "out" / "rows.safetensors")
    assert weights["token_ids"].tolist() == [KILN, POT] and weights["rows"].shape == (2, 32)
    assert metadata["kiln_format"] == "token_rows" and json.loads(metadata["words"]) == ["kiln", "pot"]
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["step"] == "30"
    base_table = build_builtin("tiny-sd15").text_encoder.get_input_embeddings().weight.detach()
    assert not torch.equal(weights["rows"], base_table[[KILN, POT]])
    assert loss_with(weights) < loss_with(None) * 0.999, "the rows did not learn"

    monkeypatch.undo()  # the merge tool loads its own fresh base model
    merged_path = tmp_path / "merged.safetensors"
    assert merge_lora.main(["builtin:tiny-sd15", str(merged_path), "--precision", "fp32", "--lora",
                            str(tmp_path / "out" / "rows.safetensors")]) == 0
    merged, saved = load_file(merged_path), load_file(tmp_path / "out" / "rows-model.safetensors")
    assert merged.keys() == saved.keys() and all(torch.equal(merged[k], saved[k]) for k in merged)
    plain = tmp_path / "plain.safetensors"
    from library.models.saving import save_model

    save_model(build_builtin("tiny-sd15"), plain, torch.float32)
    base = load_file(plain)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed == [TABLE]  # one tensor, and in it only the chosen rows
    rows_changed = (base[TABLE] != merged[TABLE]).any(dim=1).nonzero().flatten().tolist()
    assert sorted(rows_changed) == sorted([KILN, POT])
    assert torch.equal(merged[TABLE][[KILN, POT]], weights["rows"])


def test_whole_table_keeps_the_rows_that_changed_only(tmp_path, monkeypatch):
    assert run(config_text(tmp_path), "train.max_steps=3", "embedding_finetune.tokens=[]",
               "embedding_finetune.whole_table=true") == 0
    with safe_open(str(tmp_path / "out" / "rows.safetensors"), "pt") as handle:
        ids = set(handle.get_tensor("token_ids").tolist())
        assert handle.metadata()["whole_table"] == "true"
    tokenizer = build_clip_tokenizer()
    captions = [p.read_text(encoding="utf-8").strip() for p in SAMPLES.rglob("*.txt")]
    seen = {i for caption in captions for i in tokenizer(caption, padding="max_length", max_length=77).input_ids}
    assert KILN in ids and POT in ids and ids <= seen  # rows of tokens no prompt used stay exactly as they were


def test_refusals(tmp_path, capsys):
    path = config_text(tmp_path)
    assert run(path, "embedding_finetune.tokens=[\"dragon\"]") == 2  # in no caption: its row could never train
    assert "no caption contains any of embedding_finetune.tokens (dragon)" in capsys.readouterr().err
    with pytest.raises(ConfigError) as info:
        read_config(path, ["embedding_finetune.whole_table=true", "dataset.cache_text_encoder_outputs=true"],
                    EMBEDDING_FINETUNE)
    text = "\n".join(info.value.problems)
    assert "not both and not neither" in text and "cannot be cached" in text
    assert run(path, "--check") == 0
    assert "'kiln' → kiln</w> (#44150); 'pot' → pot</w> (#5168)" in capsys.readouterr().out
    from library.config.trainers import infer_trainer

    assert infer_trainer({"embedding_finetune": {}, "model": {}}) == "embedding_finetune"  # what queues run
