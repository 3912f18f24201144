"""Focus-aware cropping and the NN_name layout (tag_images.py prepare)."""
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

import tag_images
from library.prep import crop
from library.prep.crop import (
    Focus,
    PrepareError,
    PrepareOptions,
    crop_window,
    prepare_dataset,
    repeats_for_steps,
)
from library.data.folders import scan_subsets, subsets_from_folder


def drawn_face(width: int) -> Image.Image:
    """A grey cartoon face (brows, dark eyes, nose shadow, mouth) that OpenCV's frontal-face cascade fires on."""
    img = Image.new("L", (width, int(width * 1.3)), 200)
    w, h = img.size
    draw = ImageDraw.Draw(img)
    draw.ellipse([0.1 * w, 0.05 * h, 0.9 * w, 0.95 * h], fill=170)
    for x0 in (0.2, 0.58):
        draw.rectangle([x0 * w, 0.30 * h, (x0 + 0.22) * w, 0.34 * h], fill=60)
        draw.ellipse([(x0 + 0.02) * w, 0.38 * h, (x0 + 0.2) * w, 0.46 * h], fill=40)
    draw.polygon([(0.5 * w, 0.45 * h), (0.44 * w, 0.62 * h), (0.56 * w, 0.62 * h)], fill=140)
    draw.ellipse([0.35 * w, 0.70 * h, 0.65 * w, 0.77 * h], fill=70)
    return img.filter(ImageFilter.GaussianBlur(1)).convert("RGB")


def scene_with_face(x: int = 470, y: int = 60) -> Image.Image:
    """600x300 with a face near the right edge: a centre crop (150..450) misses it completely."""
    scene = Image.new("RGB", (600, 300), (220, 220, 220))
    scene.paste(drawn_face(100), (x, y))
    return scene


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def inside(box, window) -> bool:
    left, top, w, h = box
    return window[0] <= left and window[1] <= top and left + w <= window[2] and top + h <= window[3]


def test_window_is_largest_centred_on_focus_and_clamped():
    assert crop_window((600, 300), (512, 512), Focus(300, 150, "centre")) == (150, 0, 450, 300)
    assert crop_window((600, 300), (512, 512), Focus(580, 10, "saliency")) == (300, 0, 600, 300)
    assert crop_window((600, 300), (512, 512), Focus(10, 10, "saliency")) == (0, 0, 300, 300)
    assert crop_window((300, 600), (512, 768), Focus(150, 590, "saliency")) == (0, 150, 300, 600)  # 2:3 portrait
    zoomed = crop_window((600, 300), (512, 512), Focus(500, 100, "face", (480, 80, 40, 40)), face_zoom=2.5)
    assert zoomed == (450, 50, 550, 150)  # 2.5 x the 40 px face, centred on it


def test_injected_detector_box_stays_inside_the_crop(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (800, 400), (90, 90, 90)).save(src / "wide.png")
    box = (700, 300, 60, 60)  # bottom-right corner
    report = prepare_dataset(src, tmp_path / "out", "pot", PrepareOptions(width=64, height=64), repeats=3,
                             detector=lambda img: [box], progress=False)
    item = report.images[0]
    assert item.focus.source == "face" and inside(box, item.window)
    assert item.window == (400, 0, 800, 400)


def test_several_faces_are_kept_together_when_they_fit():
    boxes = [(100, 50, 40, 40), (330, 60, 40, 40)]
    focus = crop.find_focus(Image.new("RGB", (600, 300)), (512, 512), lambda img: boxes)
    window = crop_window((600, 300), (512, 512), focus)
    assert all(inside(b, window) for b in boxes)


def test_haar_cascade_finds_a_drawn_face_and_the_crop_keeps_it(tmp_path):
    detect = crop.haar_face_detector()
    faces = detect(scene_with_face())
    assert len(faces) == 1
    x, y, w, h = faces[0]
    assert 450 <= x and x + w <= 590 and 40 <= y and y + h <= 200  # on the drawn face at (470..570, 60..190)
    src = tmp_path / "src"
    src.mkdir()
    scene_with_face().save(src / "scene.png")
    report = prepare_dataset(src, tmp_path / "out", "kiln pot", PrepareOptions(width=96, height=96, focus="face"),
                             repeats=5, progress=False)
    item = report.images[0]
    assert item.focus.source == "face" and inside(faces[0], item.window)
    assert detect(Image.open(item.outputs[0]).resize((300, 300)))  # the face is still in the output


def test_saliency_fallback_finds_an_off_centre_object_and_plain_images_use_the_centre():
    scene = Image.new("RGB", (600, 300), (180, 190, 200))
    ImageDraw.Draw(scene).ellipse([480, 100, 560, 200], fill=(40, 40, 40))
    focus = crop.find_focus(scene, (512, 512), detector=None)
    assert focus.source == "saliency" and abs(focus.x - 520) < 25 and abs(focus.y - 150) < 25
    assert crop.find_focus(Image.new("RGB", (600, 300), (90, 90, 90)), (512, 512), None).source == "centre"


def test_prepare_layout_captions_flips_upscale_rgba_exif_and_originals_untouched(tmp_path, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    small = Image.new("RGBA", (40, 30), (200, 0, 0, 0))  # fully transparent: must come out white
    small.save(src / "small.png")
    (src / "small.txt").write_text("kiln pot, red", encoding="utf-8")
    tall = Image.new("RGB", (60, 120), (0, 0, 200))
    ImageDraw.Draw(tall).rectangle([0, 0, 29, 119], fill=(0, 200, 0))  # left half green
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it 90 degrees clockwise to 120x60
    tall.save(src / "tall.jpg", exif=exif, quality=95)
    (src / "notes.md").write_text("not an image", encoding="utf-8")
    before = digest(src)

    argv = ["prepare", str(src), str(tmp_path / "train"), "--size", "64", "--steps", "300", "--epochs", "10",
            "--flip", "--focus", "centre", "--quiet"]
    assert tag_images.main(argv) == 0
    out = capsys.readouterr().out
    assert "repeats = 300 steps / (10 epochs x 4 images) = 7.50 -> 8" in out
    assert "upscaled" in out
    folder = tmp_path / "train" / "8_photos"
    assert sorted(p.name for p in folder.iterdir()) == [
        "small.png", "small.txt", "small_flip.png", "small_flip.txt", "tall.png", "tall_flip.png"]
    assert (folder / "small_flip.txt").read_text(encoding="utf-8") == "kiln pot, red"
    assert np.asarray(Image.open(folder / "small.png")).reshape(-1, 3).min(0).tolist() == [255, 255, 255]
    upright = np.asarray(Image.open(folder / "tall.png").convert("RGB"), dtype=int)
    assert upright.shape == (64, 64, 3)
    assert upright[2, 32, 1] > 150 and upright[60, 32, 2] > 150  # rotated: green on top, blue below
    assert digest(src) == before
    assert [p.name for p in (tmp_path / "train").iterdir()] == ["8_photos"]  # no staging folder left
    scan = scan_subsets(subsets_from_folder(tmp_path / "train"))
    assert scan.num_train_samples() == 4 * 8 and scan.subsets[0].class_tokens == "photos"


def test_repeats_formula_and_its_arithmetic():
    assert repeats_for_steps(4800, 10, 32)[0] == 15  # the seed tutorial's example
    repeats, line = repeats_for_steps(1500, 10, 12)
    assert repeats == 13 and "1500 steps / (10 epochs x 12 images) = 12.50 -> 13" in line
    assert repeats_for_steps(10, 10, 100)[0] == 1  # never zero
    assert repeats_for_steps(1000, 10, 20, batch_size=2)[0] == 10
    with pytest.raises(PrepareError):
        repeats_for_steps(100, 0, 10)


def test_prepare_refuses_to_reuse_a_dataset_folder_and_bad_option_mixes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (80, 80)).save(src / "a.png")
    (tmp_path / "out" / "10_pot").mkdir(parents=True)
    options = PrepareOptions(width=32, height=32, focus="centre")
    with pytest.raises(PrepareError, match="10_pot already exists"):
        prepare_dataset(src, tmp_path / "out", "pot", options, repeats=3, progress=False)
    with pytest.raises(PrepareError, match="not both"):
        prepare_dataset(src, tmp_path / "out", "vase", options, repeats=3, steps=10, epochs=1, progress=False)
    with pytest.raises(PrepareError, match="go together"):
        prepare_dataset(src, tmp_path / "out", "vase", options, steps=10, progress=False)
    with pytest.raises(PrepareError, match="at least 1"):
        prepare_dataset(src, tmp_path / "out", "vase", options, steps=10, epochs=0, progress=False)
    with pytest.raises(PrepareError, match="no images directly in"):
        prepare_dataset(tmp_path / "out", tmp_path / "x", "vase", options, repeats=1, progress=False)


def test_missing_opencv_falls_back_in_auto_and_errors_for_face(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (80, 40), (10, 10, 10)).save(src / "a.png")
    report = prepare_dataset(src, tmp_path / "out", "pot", PrepareOptions(width=32, height=32), repeats=2,
                             progress=False)
    assert any("face detection off" in note and "opencv-python-headless" in note for note in report.notes)
    with pytest.raises(PrepareError, match="needs the 'cv2' package"):
        prepare_dataset(src, tmp_path / "out", "vase", PrepareOptions(width=32, height=32, focus="face"),
                        repeats=2, progress=False)


def test_sources_with_clashing_names_never_overwrite_each_other(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(["a.png", "a.jpg", "a_flip.png"]):
        Image.new("RGB", (40, 40), (i * 100, 0, 0)).save(src / name)
    report = prepare_dataset(src, tmp_path / "out", "pot", PrepareOptions(width=16, height=16, focus="centre",
                             flip=True), repeats=1, progress=False)
    names = sorted(p.name for item in report.images for p in item.outputs)
    assert len(names) == len(set(names)) == 6
    assert sorted(p.name for p in report.folder.iterdir()) == names
