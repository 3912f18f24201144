"""WD14 tagging through onnxruntime on a tiny model built here, and the captioner on a tiny random BLIP.

The tiny tagger has the WD14 signature (NHWC float32 [N, 448, 448, 3] in, one probability per CSV row out).
Each tag's probability is the mean of one colour channel / 255, read in BGR order, so a test picks a colour
and knows exactly which tags must pass which threshold.
"""
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import tag_images
from library.prep import tagging
from library.prep.tag_edit import BACKUP_FOLDER
from library.prep.tagging import (
    TaggingError,
    TagOptions,
    WD14Tagger,
    label_images,
    select_tags,
    wd14_input,
)

B, G, R = 0, 1, 2
# name, category, channel whose mean is the probability
TAGS = [("general", 9, G), ("sensitive", 9, R), ("red_theme", 0, R), ("blue_theme", 0, B),
        ("green_theme", 0, G), ("kiln_chan_(pottery)", 4, R), ("^_^", 0, R)]
COLOUR = (230, 128, 26)  # RGB: R 0.90, G 0.50, B 0.10


def build_tagger(folder: Path, batch: int | str = "batch") -> Path:
    from onnx import TensorProto, helper, numpy_helper

    weights = np.zeros((3, len(TAGS)), np.float32)
    for column, (_, _, channel) in enumerate(TAGS):
        weights[channel, column] = 1.0 / 255.0
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1:0"], ["means"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["means", "weights"], ["predictions_sigmoid"])],
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [batch, 448, 448, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(TAGS)])],
        [numpy_helper.from_array(weights, "weights")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    rows = "\n".join(f"{i},{name},{cat},{100 - i}" for i, (name, cat, _) in enumerate(TAGS))
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n" + rows + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tagger(tmp_path_factory.mktemp("wd14") / "tiny")


def images(folder: Path, colours: dict[str, tuple[int, int, int]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, colour in colours.items():
        Image.new("RGB", (32, 32), colour).save(folder / f"{stem}.png")
        paths.append(folder / f"{stem}.png")
    return paths


def test_preprocessing_pads_white_resizes_and_uses_bgr():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    arr = wd14_input(img, 448)
    assert arr.shape == (448, 448, 3) and arr.dtype == np.float32
    assert arr[224, 224].tolist() == [0.0, 0.0, 255.0]  # red, in BGR order
    assert arr[5, 224].tolist() == [255.0, 255.0, 255.0]  # white padding above the wide image
    rgba = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    assert wd14_input(rgba, 448)[100, 100].tolist() == [255.0, 255.0, 255.0]  # transparency is white


def test_model_probabilities_follow_the_colour_in_bgr_order(model_dir):
    tagger = WD14Tagger(model_dir)
    assert tagger.input_size == 448 and tagger.fixed_batch is None
    probs = tagger.probabilities([Image.new("RGB", (16, 16), COLOUR)])
    assert probs.shape == (1, len(TAGS))
    assert probs[0, 2] == pytest.approx(230 / 255, abs=5e-3)  # red_theme reads the R channel
    assert probs[0, 3] == pytest.approx(26 / 255, abs=5e-3)


def test_thresholds_rating_underscores_and_excludes(model_dir):
    tagger = WD14Tagger(model_dir)
    probs = tagger.probabilities([Image.new("RGB", (16, 16), COLOUR)])[0]
    table = tagger.table
    assert select_tags(probs, table, TagOptions()) == ["kiln chan (pottery)", "red theme", "^_^", "green theme"]
    strict = TagOptions(general_threshold=0.6, character_threshold=0.95, underscores_to_spaces=False)
    assert select_tags(probs, table, strict) == ["red_theme", "^_^"]
    rated = TagOptions(rating=True, exclude=("green_theme", "Kiln Chan (pottery)"))
    assert select_tags(probs, table, rated) == ["sensitive", "red theme", "^_^"]
    with pytest.raises(TaggingError, match="general-threshold"):
        TagOptions(general_threshold=1.5)


def test_write_modes_skip_overwrite_append_with_backups(model_dir, tmp_path):
    tagger = WD14Tagger(model_dir)
    paths = images(tmp_path / "10_pot", {"new": COLOUR, "old": COLOUR, "empty": COLOUR})
    (tmp_path / "10_pot" / "old.txt").write_text("my tag, red theme", encoding="utf-8")
    (tmp_path / "10_pot" / "empty.txt").write_text("", encoding="utf-8")
    label = tagger.labeller(TagOptions(general_threshold=0.6, character_threshold=1.0))

    report = label_images(paths, label, tmp_path, mode="skip", progress=False)
    assert sorted(p.stem for p in report.written) == ["empty", "new"] and [p.stem for p in report.skipped] == ["old"]
    assert (tmp_path / "10_pot" / "new.txt").read_text(encoding="utf-8") == "red theme, ^_^\n"
    assert (tmp_path / "10_pot" / "old.txt").read_text(encoding="utf-8") == "my tag, red theme"
    assert report.backup_dir is None  # nothing with text was replaced

    report = label_images(paths, label, tmp_path, mode="append", progress=False)
    assert (tmp_path / "10_pot" / "old.txt").read_text(encoding="utf-8") == "my tag, red theme, ^_^\n"
    assert sorted(p.stem for p in report.unchanged) == ["empty", "new"]
    assert report.summary_lines()[0].startswith("0 captions written, 1 appended to, 2 unchanged")
    assert (report.backup_dir / "10_pot" / "old.txt").read_text(encoding="utf-8") == "my tag, red theme"

    report = label_images(paths, label, tmp_path, mode="overwrite", progress=False)
    assert (tmp_path / "10_pot" / "old.txt").read_text(encoding="utf-8") == "red theme, ^_^\n"
    assert len(list((tmp_path / BACKUP_FOLDER).iterdir())) == 2  # the append-run backup is kept

    # trigger words come first in every mode, appended captions included
    label_images(paths, label, tmp_path, mode="append", trigger=("kiln pot", "^_^"), progress=False)
    assert (tmp_path / "10_pot" / "old.txt").read_text(encoding="utf-8") == "kiln pot, ^_^, red theme\n"
    assert sorted(p.name for p in (tmp_path / "10_pot").iterdir()) == [
        "empty.png", "empty.txt", "new.png", "new.txt", "old.png", "old.txt"]


def test_batches_larger_and_smaller_than_the_folder_agree_and_bad_images_are_reported(model_dir, tmp_path):
    tagger = WD14Tagger(model_dir)
    paths = images(tmp_path / "a", {"red": (250, 10, 10), "blue": (10, 10, 250), "green": (10, 250, 10)})
    broken = tmp_path / "a" / "broken.png"
    broken.write_bytes(b"not a png")
    label = tagger.labeller(TagOptions(character_threshold=1.0))
    report = label_images(sorted(paths + [broken]), label, tmp_path, batch_size=2, progress=False)
    assert [p.name for p, _ in report.failed] == ["broken.png"] and len(report.written) == 3
    texts = {p.stem: p.with_suffix(".txt").read_text(encoding="utf-8") for p in paths}
    assert texts == {"red": "red theme, ^_^\n", "blue": "blue theme\n", "green": "green theme\n"}
    single = tagger.probabilities([Image.open(p) for p in paths])
    # float32 ReduceMean over 448x448 pixels rounds a little differently per batch shape
    assert np.allclose(single, np.concatenate([tagger.probabilities([Image.open(p)]) for p in paths]), atol=5e-3)


def test_fixed_batch_models_get_padded_batches(tmp_path):
    tagger = WD14Tagger(build_tagger(tmp_path / "fixed", batch=2))
    assert tagger.fixed_batch == 2
    probs = tagger.probabilities([Image.new("RGB", (8, 8), COLOUR)] * 3)
    assert probs.shape == (3, len(TAGS)) and np.allclose(probs[2, 2], 230 / 255, atol=5e-3)


def test_tag_command_end_to_end(model_dir, tmp_path, capsys):
    paths = images(tmp_path / "data" / "10_pot", {"one": COLOUR})
    argv = ["tag", str(tmp_path / "data"), "--model", str(model_dir), "--trigger", "kiln pot", "--exclude",
            "green theme, ^_^", "--rating", "--keep-underscores", "--quiet"]
    assert tag_images.main(argv) == 0
    assert "1 captions written" in capsys.readouterr().out
    assert paths[0].with_suffix(".txt").read_text(encoding="utf-8") == \
        "kiln pot, sensitive, kiln_chan_(pottery), red_theme\n"


def test_model_folder_problems_are_named(model_dir, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model.onnx").write_bytes((model_dir / "model.onnx").read_bytes())
    with pytest.raises(TaggingError, match="lacks selected_tags.csv"):
        tagging.resolve_tagger_model(str(partial))
    (partial / "selected_tags.csv").write_text("tag_id,name,category\n0,a,0\n", encoding="utf-8")
    with pytest.raises(TaggingError, match="outputs 7 scores but selected_tags.csv lists 1"):
        WD14Tagger(partial)
    (partial / "selected_tags.csv").write_text("id,tag\n0,a\n", encoding="utf-8")
    with pytest.raises(TaggingError, match="expected a header"):
        WD14Tagger(partial)
    images(tmp_path / "data", {"x": COLOUR})
    assert tag_images.main(["tag", str(tmp_path / "data"), "--model", str(tmp_path / "nope" / "x")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_missing_onnxruntime_is_one_clear_line(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(TaggingError, match=r"needs the 'onnxruntime' package, which is not installed.*pip install"):
        WD14Tagger(model_dir)


def test_hub_repo_id_uses_the_cache_and_fails_clearly_offline(model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # belt and braces: this test must never go online
    with pytest.raises(TaggingError, match="offline and not in the Hugging Face cache"):
        tagging.resolve_tagger_model("SmilingWolf/wd-v1-4-convnext-tagger-v2", cache_dir=tmp_path / "empty")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--SmilingWolf--wd-v1-4-convnext-tagger-v2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("model.onnx", "selected_tags.csv"):
        (snapshot / name).write_bytes((model_dir / name).read_bytes())
    found = tagging.resolve_tagger_model("SmilingWolf/wd-v1-4-convnext-tagger-v2", cache_dir=tmp_path / "cache")
    assert found == snapshot and WD14Tagger(found).table.names[2] == "red_theme"


# ---------------------------------------------------------------------------------------------- captioner

@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    """A randomly initialised BLIP with a 13-word BERT vocabulary, saved with its processor (all offline)."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "pot", "red", "kiln", "[DEC]"]
    vocab = {word: i for i, word in enumerate(words)}
    tokenizer = BertTokenizer(vocab=vocab)
    tokenizer.bos_token = "[DEC]"
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**sizes, "vocab_size": len(words), "max_position_embeddings": 32, "bos_token_id": vocab["[DEC]"],
            "sep_token_id": 3, "pad_token_id": 0}
    vision = {**sizes, "image_size": 32, "patch_size": 16}
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16))
    folder = tmp_path_factory.mktemp("blip") / "tiny-blip"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_captioner_writes_sentences_with_the_same_write_modes(blip_dir, tmp_path):
    captioner = tagging.Captioner(blip_dir, max_new_tokens=5, num_beams=1)
    pics = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 40), (30, 30, 200))]
    texts = captioner.caption(pics)
    assert len(texts) == 2 and all(texts) and texts == captioner.caption(pics)  # deterministic, non-empty
    assert all(set(t.split()) <= {"a", "photo", "of", "cat", "pot", "red", "kiln"} for t in texts)

    paths = images(tmp_path, {"x": (200, 30, 30), "y": (30, 30, 200)})
    (tmp_path / "y.txt").write_text("hand written", encoding="utf-8")
    report = label_images(paths, captioner.labeller(), tmp_path, mode="skip", batch_size=2, trigger=("kiln pot",),
                          progress=False)
    assert [p.stem for p in report.written] == ["x"] and [p.stem for p in report.skipped] == ["y"]
    assert (tmp_path / "x.txt").read_text(encoding="utf-8") == f"kiln pot, {texts[0]}\n"
    assert (tmp_path / "y.txt").read_text(encoding="utf-8") == "hand written"
    report = label_images(paths, captioner.labeller(), tmp_path, mode="overwrite", progress=False)
    assert (tmp_path / "y.txt").read_text(encoding="utf-8") == f"{texts[1]}\n"
    assert (report.backup_dir / "y.txt").read_text(encoding="utf-8") == "hand written"


def test_caption_command_and_bad_model_folder(blip_dir, tmp_path, capsys):
    images(tmp_path / "data", {"x": (10, 200, 10)})
    argv = ["caption", str(tmp_path / "data"), "--model", str(blip_dir), "--beams", "1", "--max-new-tokens", "4",
            "--prompt", "a photo of", "--quiet"]
    assert tag_images.main(argv) == 0
    assert "1 captions written" in capsys.readouterr().out
    assert (tmp_path / "data" / "x.txt").read_text(encoding="utf-8").strip()
    assert tag_images.main(["caption", str(tmp_path / "data"), "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
