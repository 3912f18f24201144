"""Mixed precision through the scripts users run: a bf16 run trains as accurately as fp32 (its loss within 1 %),
its VAE encodes in bf16 under its own latent-cache key, a DreamBooth model keeps its VAE exact, and the VAE's
memory goes back once latents are cached unless previews or the saved model need it."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import train_dreambooth
import train_lora
from library.models.builtin import build_builtin
from library.models.loading import load_model
from library.recipes.lora import RECIPE as LORA
from library.training.hooks import TrainerHooks
from library.training.trainer import Trainer
from tests.helpers import resolved_run, write_run_config

LORA_BODY = "[network]\nrank = 4\nalpha = 4\n[optimizer]\nlr = 2e-3\n"


def cache_entries(folder: Path) -> dict[Path, dict]:
    entries = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            entries[path] = handle.metadata()
    return entries


@pytest.fixture(scope="module")
def fp32_and_bf16_runs(tmp_path_factory) -> dict:
    """The same LoRA run in fp32, then in bf16, sharing one disk latent cache (as on a CPU with bf16 kernels;
    without them the VAE stays fp32: test_a_cpu_without_bf16_kernels_keeps_the_vae_in_fp32)."""
    tmp = tmp_path_factory.mktemp("precision")
    config = write_run_config(tmp, LORA_BODY + "[train]\nmax_steps = 6\nbatch_size = 2\nseed = 7\n")
    cache = tmp / "cache"
    runs = {}
    for precision in ("no", "bf16"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("library.recipes.resolve.cpu_has_bf16", lambda: True)
            assert train_lora.main([str(config), f"train.mixed_precision={precision}", "dataset.cache_latents=disk",
                                    f"dataset.cache_dir={cache}", f"save.name=t_{precision}"]) == 0
        summary = json.loads((tmp / "out" / f"t_{precision}.run.json").read_text(encoding="utf-8"))
        runs[precision] = {"loss": summary["final_loss"], "cache": cache_entries(cache)}
    return runs


def test_a_bf16_runs_loss_stays_within_one_percent_of_fp32(fp32_and_bf16_runs):
    fp32, bf16 = fp32_and_bf16_runs["no"]["loss"], fp32_and_bf16_runs["bf16"]["loss"]
    assert fp32 > 0 and abs(bf16 - fp32) <= 0.01 * fp32, (fp32, bf16)


def test_a_bf16_run_encodes_latents_in_bf16_and_never_reuses_fp32_entries(fp32_and_bf16_runs):
    after_fp32 = fp32_and_bf16_runs["no"]["cache"]
    after_both = fp32_and_bf16_runs["bf16"]["cache"]
    assert after_fp32 and all("encode_dtype" not in meta for meta in after_fp32.values())
    added = {path: meta for path, meta in after_both.items() if path not in after_fp32}
    assert len(added) == len(after_fp32)  # every image encoded again, none taken from the fp32 entries
    assert {meta["encode_dtype"] for meta in added.values()} == {"bfloat16"}


def test_a_cpu_without_bf16_kernels_keeps_the_vae_in_fp32(tmp_path, monkeypatch, capsys):
    """Without bf16 kernels a bf16 VAE encode takes minutes per image on the CPU: the VAE stays fp32 there."""
    monkeypatch.setattr("library.recipes.resolve.cpu_has_bf16", lambda: False)
    config = write_run_config(tmp_path, LORA_BODY + "[train]\nmax_steps = 1\nmixed_precision = \"bf16\"\n")
    assert train_lora.main([str(config), "dataset.cache_latents=disk", f"dataset.cache_dir={tmp_path / 'c'}"]) == 0
    assert "loaded as: UNet bf16, text encoder bf16, VAE fp32" in capsys.readouterr().out
    assert all("encode_dtype" not in meta for meta in cache_entries(tmp_path / "c").values())  # fp32 entries


def test_a_bf16_dreambooth_run_saves_the_vae_exactly_as_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("library.training.model_setup.cpu_has_bf16", lambda: False)  # as on an AVX2-only CPU
    config = write_run_config(tmp_path, "[dreambooth]\n[optimizer]\nlr = 1e-4\n[train]\nmax_steps = 1\n"
                                        "batch_size = 2\nseed = 3\n[save]\noutput_dir = \"{tmp}/out\"\nname = \"t\"\n"
                                        "precision = \"fp32\"\n")
    assert train_dreambooth.main([str(config), "train.mixed_precision=bf16"]) == 0
    # what trains and what it saves whole stay fp32; the frozen text encoder is read in bf16
    out = capsys.readouterr().out
    assert "loaded as: UNet fp32, text encoder bf16, VAE fp32" in out
    assert "note: this CPU has no native bf16 kernels" in out  # bf16 would be slower than fp32 on it
    saved, base = load_model(str(tmp_path / "out" / "t.safetensors")), build_builtin("tiny-sd15")
    for name, tensor in base.vae.state_dict().items():
        assert torch.equal(saved.vae.state_dict()[name], tensor), name


class Previews(TrainerHooks):
    needs_vae = True


def trained_vae(tmp_path, overrides=(), hooks=None, saves_model=False):
    """The VAE after a 1-step LoRA run on the tiny model."""
    _, run = resolved_run(LORA, tmp_path, LORA_BODY, ("train.max_steps=1", *overrides))
    parts = build_builtin("tiny-sd15")
    built = LORA.build(parts, run)
    built.trainable.saves_base_model = saves_model
    Trainer(run, parts, built.trainable, hooks).train()
    return parts.vae


def devices(module: torch.nn.Module) -> set[str]:
    return {p.device.type for p in module.parameters()}


def test_the_vae_is_freed_once_latents_are_cached_in_memory(tmp_path):
    vae = trained_vae(tmp_path)
    assert devices(vae) == {"meta"}
    assert vae.config.scaling_factor > 0  # its config stays readable


def test_the_disk_cache_keeps_only_the_encoder_to_rebuild_damaged_entries(tmp_path):
    vae = trained_vae(tmp_path, ("dataset.cache_latents=disk", f"dataset.cache_dir={tmp_path / 'cache'}"))
    assert devices(vae.encoder) == {"cpu"} and devices(vae.quant_conv) == {"cpu"}
    assert devices(vae.decoder) == {"meta"}


@pytest.mark.parametrize("case", ["previews", "whole_model_saved", "latents_not_cached"])
def test_the_vae_stays_where_it_is_still_needed(case, tmp_path):
    if case == "previews":
        vae = trained_vae(tmp_path, hooks=Previews())
    elif case == "whole_model_saved":
        vae = trained_vae(tmp_path, saves_model=True)
    else:
        vae = trained_vae(tmp_path, ("dataset.cache_latents=off",))
    assert devices(vae) == {"cpu"}
    assert torch.equal(vae.decoder.conv_out.weight, build_builtin("tiny-sd15").vae.decoder.conv_out.weight)
