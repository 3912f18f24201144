"""The three trainers on builtin:tiny-sdxl, end to end through the scripts: they learn, write the files SDXL tools
load (kohya SDXL LoRA, clip_l/clip_g embeddings, an original-layout SDXL checkpoint), resume exactly, keep latent
caches apart per model, and never let the VAE overflow fp16."""
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

import prepare_buckets
import train_dreambooth
import train_lora
import train_textual_inversion
from library.models import ldm_layout as layout
from library.models.builtin import build_builtin
from library.models.loading import load_model
from library.models.paths import CONFIG_ROOT
from library.networks.embeddings import add_tokens, init_vectors, load_embedding, read_png_embedding
from library.networks.merge import merge_network
from library.data.batches import hash_ints
from library.recipes.class_images import decode_images
from library.recipes.textual_inversion import RECIPE as TI_RECIPE
from library.training.hooks import CombinedHooks, TrainerHooks
from library.training.trainer import Trainer
from tests.helpers import SAMPLES, resolved_run, training_set_loss, write_run_config
from tests.models.test_models import assert_same_weights

REPO = Path(__file__).resolve().parents[2]
SDXL = "builtin:tiny-sdxl"
TODAY = datetime.date.today().isoformat()


def config(tmp: Path, body: str) -> Path:
    return write_run_config(tmp, body, model=SDXL)


def scalars(log_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(next(log_dir.rglob("events.out.tfevents.*")).parent))
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars(tag)]


# ---------------------------------------------------------------------------------------------- LoRA

LORA_BODY = """
[network]
rank = 8
alpha = 4
conv_rank = 2
conv_alpha = 1
unet_lr = 2e-3
text_encoder_lr = [1e-3, 3e-4]
[train]
max_steps = 30
batch_size = 2
seed = 7
"""


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl-lora")
    assert train_lora.main([str(config(tmp, LORA_BODY))]) == 0
    return tmp


def test_lora_learns_and_writes_a_kohya_sdxl_file(lora_run):
    path = lora_run / "out" / "t.safetensors"
    weights = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    modules = {k.split(".")[0] for k in weights}
    assert all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"))
               for m in modules), sorted(modules)[:5]
    assert "lora_unet_output_blocks_2_2_conv" in modules  # LoCon reaches the upsampler by its original name
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sdxl_base_v1-0", "False")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["ss_text_encoder_lr"] == "0.001"  # one number, as sd-scripts writes it
    assert json.loads(meta["kiln.text_encoder_lr"]) == {"text_encoder": 0.001, "text_encoder_2": 0.0003}
    assert scalars(lora_run / "logs", "lr/text_encoder_2")[-1] == pytest.approx(3e-4)
    assert scalars(lora_run / "logs", "lr/text_encoder")[-1] == pytest.approx(1e-3)

    parts = build_builtin("tiny-sdxl")
    before = training_set_loss(parts, SAMPLES)
    assert merge_network(parts, {k: v.float() for k, v in weights.items()}) == []
    after = training_set_loss(parts, SAMPLES)
    assert after < before * 0.97, (before, after)


def test_diffusers_sdxl_pipeline_applies_the_trained_file_as_kiln_merges_it(lora_run):
    path = lora_run / "out" / "t.safetensors"
    merged = build_builtin("tiny-sdxl")
    merge_network(merged, {k: v.float() for k, v in load_file(str(path)).items()})
    pipe = build_builtin("tiny-sdxl").pipeline()
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        theirs, _, theirs_pooled, _ = pipe.encode_prompt("a kiln pot", do_classifier_free_guidance=False)
        ours = merged.family.encode_text(merged, ["a kiln pot"], 1)
        latents, added = torch.randn(1, 4, 8, 8), {"text_embeds": ours.pooled,
                                                    "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        unet_theirs = pipe.unet(latents, 500, ours.hidden_states, added_cond_kwargs=added).sample
        unet_ours = merged.unet(latents, 500, ours.hidden_states, added_cond_kwargs=added).sample
    assert torch.allclose(theirs, ours.hidden_states, atol=1e-4) and torch.allclose(theirs_pooled, ours.pooled,
                                                                                    atol=1e-4)
    assert torch.allclose(unet_theirs, unet_ours, atol=1e-4)


USUAL_SDXL = ("network.train_text_encoder=false", "dataset.cache_text_encoder_outputs=true",
              "dataset.cache_latents=off", "dataset.random_crop=true", "dataset.flip_aug=true",
              "dataset.enable_buckets=true", "dataset.min_bucket_reso=32", "dataset.max_bucket_reso=128",
              "dataset.bucket_reso_steps=32", "train.max_steps=6", "save.precision=fp32",
              "train.mixed_precision=bf16", "train.gradient_checkpointing=true")


def test_unet_only_lora_with_cached_text_outputs_resumes_exactly(tmp_path):
    """The usual SDXL LoRA (text encoders frozen and cached), with random crops, flips and buckets varying the
    size ids, bf16 frozen weights and gradient checkpointing: a resumed run ends with the very same weights."""
    path = config(tmp_path, "[network]\nrank = 4\nalpha = 4\n[optimizer]\nlr = 1e-3\n")
    assert train_lora.main([str(path), *USUAL_SDXL, "save.every_n_steps=3", "save.save_state=true"]) == 0
    reference = load_file(str(tmp_path / "out" / "t.safetensors"))
    assert not any(k.startswith("lora_te") for k in reference)
    state = tmp_path / "out" / "t-step00000003-state"
    assert train_lora.main([str(path), *USUAL_SDXL, f"save.resume={state.as_posix()}",
                            f"save.output_dir={(tmp_path / 'b').as_posix()}"]) == 0
    resumed = load_file(str(tmp_path / "b" / "t.safetensors"))
    assert reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_sdxl_preset_check_shows_sdxl_buckets(capsys):
    overrides = [f"model.path={SDXL}", f"dataset.train_dir={SAMPLES.as_posix()}"]
    assert train_lora.main([str(REPO / "configs" / "lora_sdxl.toml"), *overrides, "--check"]) == 0
    out = capsys.readouterr().out
    assert "sides 512-2048 px in steps of 64, area at most 1024x1024" in out
    assert "1024x1024" in out and "1152x896" in out  # the sample images: square and 4:3 landscape


# ---------------------------------------------------------------------------------------------- textual inversion

TI_BODY = """
[embedding]
name = "kilnpot"
init_text = "pot"
vectors = 2
template = "[name], [filewords]"
learn_rate = "0.02"
latent_sampling_method = "deterministic"
[train]
max_steps = 24
batch_size = 3
seed = 7
[save]
output_dir = "{tmp}/out"
[ti_log]
save_embedding_every = 12
create_image_every = 12
preview_steps = 2
write_csv_every = 1
"""


@pytest.fixture(scope="module")
def ti_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl-ti")
    assert train_textual_inversion.main([str(config(tmp, TI_BODY))]) == 0
    return tmp


class StepLosses(TrainerHooks):
    """After each optimizer step, the loss of the batch it trained on (same noise and timesteps) again."""

    def __init__(self):
        self.pairs: list[tuple[float, float]] = []

    def after_step(self, trainer, loop, loss, lrs, batch):
        progress = trainer.progress
        step_seed = hash_ints(trainer.config.train.seed, progress.epoch, progress.next_batch - 1)
        with torch.no_grad():
            self.pairs.append((loss, trainer._loss(loop, batch, progress.epoch, step_seed).item()))


def test_ti_learns_its_training_batches(tmp_path):
    """Every step lowers the loss on the batch it trained on. (The tiny random SDXL barely listens to its
    text: a prompt changes its loss by 0.05 %, so, unlike SD1's, its loss on other noise shows no TI effect.)"""
    _, run = resolved_run(TI_RECIPE, tmp_path, TI_BODY, ("train.max_steps=8", "ti_log.create_image_every=0",
                                                        "ti_log.save_embedding_every=0"), model=SDXL)
    parts = build_builtin("tiny-sdxl")
    built = TI_RECIPE.build(parts, run)
    recorder = StepLosses()
    run = dataclasses.replace(run, data=built.data)
    Trainer(run, parts, built.trainable, CombinedHooks(built.hooks, recorder), built.start).train()
    gains = [before - after for before, after in recorder.pairs]
    assert len(gains) == 8 and sum(g > 0 for g in gains) >= 7 and sum(gains) > 0, recorder.pairs


def test_ti_learns_and_writes_clip_l_and_clip_g_with_the_a1111_log(ti_run):
    final = load_file(str(ti_run / "out" / "kilnpot.safetensors"))
    assert {k: tuple(v.shape) for k, v in final.items()} == {"clip_l": (2, 32), "clip_g": (2, 64)}
    assert not (ti_run / "out" / "kilnpot.pt").exists()
    parts = build_builtin("tiny-sdxl")
    initial = [init_vectors(t, e, "pot", 2)[0] for t, e in zip(parts.tokenizers, parts.text_encoders)]
    assert not torch.allclose(initial[1], final["clip_g"], atol=1e-3)  # both halves trained
    assert not torch.allclose(initial[0], final["clip_l"], atol=1e-3)

    folder = ti_run / "logs" / TODAY / "kilnpot"
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    settings = [name for name in names if name.startswith("settings-") and name.endswith(".json")]
    assert len(settings) == 1  # A1111's settings-at-start file
    names.remove(settings[0])
    assert names == ["embeddings/kilnpot-12.safetensors", "embeddings/kilnpot-12.safetensors.optim",
                     "embeddings/kilnpot-24.safetensors", "embeddings/kilnpot-24.safetensors.optim",
                     "image_embeddings/kilnpot-12.png", "image_embeddings/kilnpot-24.png", "images/kilnpot-12.png",
                     "images/kilnpot-24.png", "textual_inversion_loss.csv"]
    in_png = read_png_embedding(folder / "image_embeddings" / "kilnpot-24.png")
    assert torch.equal(in_png["clip_g"], final["clip_g"]) and in_png["step"] == 24
    assert set(load_embedding(folder / "image_embeddings" / "kilnpot-24.png").per_encoder) == {"clip_l", "clip_g"}


def test_ti_file_loads_into_diffusers_and_conditions_as_training_did(ti_run):
    final = load_file(str(ti_run / "out" / "kilnpot.safetensors"))
    pipe = build_builtin("tiny-sdxl").pipeline()
    pipe.load_textual_inversion(final["clip_l"], token="kilnpot", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(final["clip_g"], token="kilnpot", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    ours = build_builtin("tiny-sdxl")
    for tokenizer, encoder, values in zip(ours.tokenizers, ours.text_encoders, (final["clip_l"], final["clip_g"])):
        ids = add_tokens(tokenizer, encoder, "kilnpot", 2)
        with torch.no_grad():
            encoder.get_input_embeddings().weight[ids] = values
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("kilnpot, vase", do_classifier_free_guidance=False)
        expected = ours.family.encode_text(ours, ["kilnpot kilnpot_1, vase"], 1)
    assert torch.allclose(embeds, expected.hidden_states, atol=1e-5)
    assert torch.allclose(pooled, expected.pooled, atol=1e-5)


def test_ti_resumes_exactly_from_a_copy_and_refuses_pt(ti_run, tmp_path, capsys):
    copy = ti_run / "logs" / TODAY / "kilnpot" / "embeddings" / "kilnpot-12.safetensors"
    path = config(tmp_path, TI_BODY)
    assert train_textual_inversion.main([str(path), f"embedding.resume={copy.as_posix()}"]) == 0
    assert "loaded the optimizer state" in capsys.readouterr().out
    resumed, reference = (load_file(str(p)) for p in (tmp_path / "out" / "kilnpot.safetensors",
                                                        ti_run / "out" / "kilnpot.safetensors"))
    assert all(torch.allclose(resumed[k], reference[k], atol=1e-6) for k in reference)
    with pytest.raises(SystemExit):
        train_textual_inversion.main([str(path), "embedding.format=pt", "--check"])
    assert "has no SDXL form" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- DreamBooth

DREAMBOOTH_BODY = """
[dreambooth]
train_text_encoder = true
stop_text_encoder_training = 3
unet_lr = 1e-3
text_encoder_lr = 1e-4
class_dir = "{tmp}/class/1_pot"
class_prompt = "a photo of a pot"
num_class_images = 2
class_sampling_steps = 2
[optimizer]
lr = 1e-3
[train]
max_steps = 6
batch_size = 4
seed = 7
[save]
output_dir = "{tmp}/out"
name = "t"
precision = "fp32"
every_n_steps = 3
save_state = true
"""


@pytest.fixture(scope="module")
def dreambooth_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl-db")
    assert train_dreambooth.main([str(config(tmp, DREAMBOOTH_BODY))]) == 0
    return tmp


def test_dreambooth_learns_and_saves_an_sdxl_checkpoint_diffusers_loads(dreambooth_run):
    final = dreambooth_run / "out" / "t.safetensors"
    assert len(list((dreambooth_run / "class" / "1_pot").glob("kiln-class-*.png"))) == 2
    keys = load_file(str(final))
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert any(k.startswith(layout.SDXL_OPENCLIP_PREFIX) for k in keys)
    tuned, base = load_model(str(final)), build_builtin("tiny-sdxl")
    before, after = (training_set_loss(m, SAMPLES) for m in (base, tuned))
    assert after < before * 0.95, (before, after)
    pipe = StableDiffusionXLPipeline.from_single_file(str(final), config=str(CONFIG_ROOT / "tiny-sdxl"),
                                                      local_files_only=True, tokenizer=tuned.tokenizers[0],
                                                      tokenizer_2=tuned.tokenizers[1])
    assert_same_weights(tuned, pipe)
    assert not torch.equal(tuned.text_encoders[1].text_projection.weight, base.text_encoders[1].text_projection.weight)


def test_dreambooth_resumes_exactly_and_a_lora_extracts_from_it(dreambooth_run, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import extract_lora

    state = dreambooth_run / "out" / "t-step00000003-state"
    path = config(dreambooth_run, DREAMBOOTH_BODY)
    assert train_dreambooth.main([str(path), f"save.resume={state.as_posix()}",
                                  f"save.output_dir={(tmp_path / 'b').as_posix()}"]) == 0
    reference, resumed = (load_file(str(p)) for p in (dreambooth_run / "out" / "t.safetensors",
                                                        tmp_path / "b" / "t.safetensors"))
    assert reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)

    out = tmp_path / "extracted.safetensors"
    assert extract_lora.main([str(dreambooth_run / "out" / "t.safetensors"), SDXL, str(out), "--rank", "8",
                              "--conv-rank", "8"]) == 0
    names = {k.split(".")[0] for k in load_file(str(out))}
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    with_lora = build_builtin("tiny-sdxl")
    assert merge_network(with_lora, {k: v.float() for k, v in load_file(str(out)).items()}) == []
    tuned, base = load_model(str(dreambooth_run / "out" / "t.safetensors")), build_builtin("tiny-sdxl")
    distances = [training_set_loss(m, SAMPLES) for m in (base, with_lora, tuned)]
    assert abs(distances[1] - distances[2]) < abs(distances[0] - distances[2]), distances


# ---------------------------------------------------------------------------------------------- caches and the VAE


def test_latent_cache_entries_are_keyed_per_model(tmp_path, capsys):
    """An SD1 cache folder never serves an SDXL run: its VAE is another, so every latent is encoded anew."""
    path = config(tmp_path, f'[dataset]\ntrain_dir = "{{train}}"\nresolution = 64\ncache_dir = "{tmp_path / "c"}"\n')
    runs = {}
    for model in ("builtin:tiny-sd15", SDXL, SDXL):
        assert prepare_buckets.main([str(path), f"model.path={model}"]) == 0
        runs.setdefault(model, []).append(capsys.readouterr().out)
    assert "0 reused, 6 encoded" in runs["builtin:tiny-sd15"][0]
    assert "0 reused, 6 encoded" in runs[SDXL][0] and "6 reused, 0 encoded" in runs[SDXL][1]


def test_half_precision_vae_overflow_is_guarded():
    """The original SDXL VAE's activations outgrow fp16 (max 65504) on bright images: inf/NaN, black images.
    bf16 has fp32's range. Here a tiny VAE with an amplified first layer shows the mechanism, and that Kiln's
    class-image decode does not fall for it under fp16 autocast."""
    parts = build_builtin("tiny-sdxl")
    vae = parts.vae
    with torch.no_grad():
        for conv in (vae.encoder.conv_in, vae.decoder.conv_in):
            conv.weight.mul_(60000 / conv.weight.abs().max())  # still representable in fp16
        white, grey = torch.ones(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)
        finite = {}
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            half = torch.nn.Module.to(vae, dtype)
            finite[dtype] = [torch.isfinite(half.encode(x.to(dtype)).latent_dist.mean).all().item()
                             for x in (white, grey)]
        torch.nn.Module.to(vae, torch.float32)
    assert finite == {torch.float32: [True, True], torch.bfloat16: [True, True], torch.float16: [False, True]}

    latents = torch.full((1, 4, 8, 8), 3.0)
    pipe = parts.pipeline()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(vae.decode(latents / vae.config.scaling_factor).sample).all()  # unguarded
        guarded = decode_images(pipe, latents)[0]
    expected = decode_images(pipe, latents)[0]  # fp32
    assert np.array_equal(np.asarray(guarded), np.asarray(expected))
