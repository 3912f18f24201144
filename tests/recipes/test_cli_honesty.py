"""What the command line tells users, checked through the real scripts: --check catches what the run would hit
and prints the summary (not the config), long captions are read up to train.max_token_length and listed when
cut, Adafactor's own learning rate trains and is logged, the run states its optimizer and a resumed run its
progress, and the A1111/sd-scripts details other tools read are written."""
import hashlib
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

import compare
import train_lora
import train_textual_inversion
from library.models.builtin import build_builtin
from library.models.clip_tokenizer import _counting_tokenizer, build_clip_tokenizer
from library.models.single_file import save_single_file
from tests.helpers import write_run_config

LONG_TAGS = ", ".join(f"tag number {i}" for i in range(40))  # about 160 tokens
LORA = "[network]\nrank = 2\nalpha = 2\n"


def run(main, path: Path, *overrides: str) -> int:
    try:
        return main([str(path), *overrides])
    except SystemExit as exit:
        return exit.code


def scalars(logs: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(logs.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def test_check_prints_model_summary_and_plan_but_not_the_config(tmp_path, capsys):
    path = write_run_config(tmp_path, LORA)
    assert run(train_lora.main, path, "--check") == 0
    out = capsys.readouterr().out
    assert "model: SD 1.x" in out and "built-in" in out
    assert "dataset:" in out and "total steps" in out and "config and dataset OK" in out
    assert "[network]" not in out  # the config only with --print-config
    assert run(train_lora.main, path, "--print-config") == 0
    assert "[network]" in capsys.readouterr().out


def test_counting_tokenizer_splits_text_exactly_as_the_models_tokenizer():
    reference = build_clip_tokenizer()
    texts = ["a photo of a cat", "Kiln POT, glaze!! 12345 x2", "héllo wörld, naïve café", "日本語のテキスト 🙂🎉",
             "it's the cat's toy, don't you'll", "  spaces   and\ttabs\nnewlines ", "a-b_c/d\\e (f) [g] {h}",
             LONG_TAGS, "<|startoftext|> literal", "masterpiece, best quality, 1girl, solo, looking at viewer"]
    ours = [encoding.ids for encoding in _counting_tokenizer().encode_batch(texts, add_special_tokens=False)]
    assert ours == [reference(text, add_special_tokens=False).input_ids for text in texts]


def test_long_captions_are_listed_and_read_up_to_max_token_length(tmp_path, capsys):
    path = write_run_config(tmp_path, LORA)
    assert run(train_lora.main, path, "--check", f"dataset.caption_suffix={json.dumps(LONG_TAGS)}") == 0
    out = capsys.readouterr().out
    assert "6 image(s) have prompts longer than train.max_token_length = 75" in out and "tokens)" in out
    assert run(train_lora.main, path, "--check", f"dataset.caption_suffix={json.dumps(LONG_TAGS)}",
               "train.max_token_length=225") == 0
    assert "longer than" not in capsys.readouterr().out

    parts = build_builtin("tiny-sd15")
    short = parts.family.encode_text(parts, [LONG_TAGS], 1, 75).hidden_states
    long = parts.family.encode_text(parts, [LONG_TAGS], 1, 225).hidden_states
    assert short.shape[1] == 77 and long.shape[1] == 227
    assert torch.allclose(long[:, :1], short[:, :1], atol=1e-5)  # the same start token state
    end = parts.family.encode_text(parts, [LONG_TAGS + ", a different ending"], 1, 225).hidden_states
    assert not torch.allclose(end[:, 100:], long[:, 100:], atol=1e-4)  # tokens past 75 reach the UNet
    assert run(train_lora.main, path, f"dataset.caption_suffix={json.dumps(LONG_TAGS)}",
               "train.max_token_length=150", "sample.prompts=[\"a kiln pot --w 64 --h 64 --s 2\"]",
               "sample.every_n_steps=2") == 0  # training and previews with 152-token conditioning


def test_adafactor_computes_its_own_rate_through_the_trainer_and_it_is_logged(tmp_path, capsys):
    path = write_run_config(tmp_path, LORA + '[optimizer]\nname = "Adafactor"\n'
                            "args = { relative_step = true, scale_parameter = true, warmup_init = true }\n")
    assert run(train_lora.main, path, "train.max_steps=3") == 0
    out = capsys.readouterr().out
    assert "optimizer: Adafactor(relative_step=True, scale_parameter=True, warmup_init=True)" in out
    assert "computed by Adafactor" in out
    rates = scalars(tmp_path / "logs", "lr/unet")
    assert len(rates) == 3 and 0 < rates[0] < rates[1] < rates[2] < 1e-3  # warmup_init: the rate grows per step


def test_dadaptation_with_different_group_rates_fails_in_check(tmp_path, capsys):
    path = write_run_config(tmp_path, LORA + '[optimizer]\nname = "DAdaptAdam"\nlr = 1.0\n')
    assert run(train_lora.main, path, "--check", "network.text_encoder_lr=0.5") == 2
    err = capsys.readouterr().err
    assert "same lr in every parameter group" in err and "text_encoder=0.5" in err


def test_a_resumed_run_plans_what_is_left(tmp_path, capsys):
    path = write_run_config(tmp_path, LORA)
    assert run(train_lora.main, path, "train.max_steps=2", "save.save_state=true") == 0
    state = tmp_path / "out" / "t-state"
    assert run(train_lora.main, path, "--check", "train.max_steps=5", f"save.resume={state}") == 0
    assert "resumed           : 2 steps done, 3 to go" in capsys.readouterr().out


def test_textual_inversion_says_captionless_images_use_their_file_name(tmp_path, capsys):
    path = write_run_config(tmp_path, '[embedding]\nname = "kilnhon"\n')
    for caption in (tmp_path / "train").rglob("*.txt"):
        caption.unlink()
    assert run(train_textual_inversion.main, path, "--check") == 0
    out = capsys.readouterr().out
    assert "use their file name as [filewords]" in out and "class tokens" not in out


def _decode_pixels(image: Image.Image) -> dict:
    """A1111's reader of an embedding stored in pixels, written independently from its description."""
    pixels = np.asarray(image.convert("RGB")).astype(np.uint8)
    bright = (pixels > 0).all(2)
    rows, cols = np.where(bright.any(1))[0], np.where(bright.any(0))[0]
    block = pixels[rows.min():rows.max() + 1, cols.min():cols.max() + 1] & 0x0F
    black = np.where(block.sum(axis=(0, 2)) == 0)[0]
    state, stream = 0, []
    size = block[:, :black.min()].size
    for _ in range(max(size, block[:, black.max() + 1:].size)):
        state = (1664525 * state + 1013904223) % 2**32
        stream.append(state % 255)
    stream = np.array(stream, dtype=np.uint8) & 0x0F
    low, high = block[:, :black.min()], block[:, black.max() + 1:]
    low = low ^ stream[:low.size].reshape(low.shape)
    high = high ^ stream[:high.size].reshape(high.shape)
    return json.loads(zlib.decompress(((high << 4) | low).flatten().tobytes()))


def test_textual_inversion_writes_a1111_details(tmp_path):
    model = tmp_path / "tiny.safetensors"
    save_single_file(build_builtin("tiny-sd15"), model, torch.float32)
    path = write_run_config(tmp_path, '[embedding]\nname = "kilnhon"\ninit_text = "pot"\n[ti_log]\n'
                            "save_embedding_every = 2\ncreate_image_every = 2\nwrite_csv_every = 1\n"
                            "preview_steps = 2\n")
    assert run(train_textual_inversion.main, path, f"model.path={model}", "train.max_steps=2") == 0
    folder = next((tmp_path / "logs").glob("*/kilnhon"))
    rows = (folder / "textual_inversion_loss.csv").read_text().splitlines()
    assert rows[1].startswith("1,0,1,") and rows[2].startswith("2,0,2,")  # epoch_step counts from 1
    settings = json.loads(next(folder.glob("settings-*.json")).read_text())
    assert settings["embedding_name"] == "kilnhon" and settings["steps"] == 2 and settings["model_name"] == "tiny"
    digest = hashlib.sha256(model.read_bytes()).hexdigest()[:10]
    assert settings["model_hash"] == digest
    saved = torch.load(tmp_path / "out" / "t.pt", weights_only=True)
    assert saved["sd_checkpoint"] == digest and saved["sd_checkpoint_name"] == "tiny"
    preview = Image.open(folder / "image_embeddings" / "kilnhon-2.png")
    plain = Image.open(folder / "images" / "kilnhon-2.png")
    assert preview.height == plain.height and preview.width > plain.width + 2  # data blocks beside the image
    data = _decode_pixels(preview)
    assert data["name"] == "kilnhon-2" and data["step"] == 2 and data["sd_checkpoint"] == digest
    stored = torch.tensor(data["string_to_param"]["*"]["TORCHTENSOR"])
    assert torch.allclose(stored, torch.load(folder / "embeddings" / "kilnhon-2.pt", weights_only=True)[
        "string_to_param"]["*"].float())


def test_lora_metadata_carries_what_sd_scripts_writes(tmp_path):
    model = tmp_path / "tiny.safetensors"
    save_single_file(build_builtin("tiny-sd15"), model, torch.float32)
    path = write_run_config(tmp_path, LORA + "[dataset]\ntrain_dir = \"{train}\"\nresolution = 64\n"
                            "enable_buckets = true\nbucket_reso_steps = 32\n")
    assert run(train_lora.main, path, f"model.path={model}", "train.gradient_checkpointing=true") == 0
    out = tmp_path / "out" / "t.safetensors"
    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(out))
    assert meta["ss_gradient_checkpointing"] == "True" and meta["ss_network_alpha"] == "2.0"
    assert (meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"]) == ("32", "128")  # resolved, not 0
    info = json.loads(meta["ss_bucket_info"])
    assert sum(b["count"] for b in info["buckets"].values()) == 60 and "mean_img_ar_error" in info
    with open(model, "rb") as handle:
        handle.seek(0x100000)
        assert meta["ss_sd_model_hash"] == hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
    # sd-scripts' precomputed hashes: the file as written with its ss_* metadata only, after the header
    data = safetensors_bytes(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_compare_renders_at_the_models_native_size_and_labels_progress(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare.main(["--model", "builtin:tiny-sd15", "--prompt", "a kiln pot", "--steps", "2",
                         "--x", "seed", "3,4", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[1/2] x seed: 3: 64x64, seed 3" in printed and "[2/2] x seed: 4" in printed
    cell = Image.open(out / "cells" / "x01-y00-z00.png")
    assert cell.size == (64, 64)  # the tiny model's native size
    assert "Seed: 4, Size: 64x64" in cell.text["parameters"]
    assert json.loads(cell.text["kiln_compare"])["width"] == 64


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_check_refuses_an_unwritable_output_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if (locked / "probe").exists() or __import__("os").access(locked, __import__("os").W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        path = write_run_config(tmp_path, LORA)
        assert run(train_lora.main, path, "--check", f"save.output_dir={locked / 'out'}") == 2
        assert "save.output_dir" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)
