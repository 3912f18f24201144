"""Weightless model skeletons (for checks before a model loads) have exactly the loaded model's adapted layers."""
import torch

from library.models.builtin import build_builtin
from library.models.single_file import save_single_file
from library.models.skeleton import model_skeleton
from library.networks.targets import network_targets

GROUPS = {"unet", "text_encoder"}


def layer_shapes(parts) -> dict[str, tuple]:
    return {t.kohya_name: tuple(model.get_submodule(t.path).weight.shape)
            for _, model, targets in network_targets(parts, GROUPS, with_conv=True) for t in targets}


def test_skeletons_match_the_models_they_describe(tmp_path):
    for name in ("tiny-sd15", "tiny-sd2"):
        skeleton = model_skeleton(f"builtin:{name}")
        assert next(skeleton.unet.parameters()).device.type == "meta"  # nothing allocated, nothing read
        loaded = build_builtin(name)
        assert skeleton.family is loaded.family
        assert layer_shapes(skeleton) == layer_shapes(loaded)
    single = tmp_path / "tiny.safetensors"
    save_single_file(loaded, single, dtype=torch.float32)
    from_file = model_skeleton(str(single))
    assert from_file.family is loaded.family and layer_shapes(from_file) == layer_shapes(loaded)


def test_no_skeleton_where_shapes_need_the_weights(tmp_path):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not read")
    assert model_skeleton(str(pickle)) is None  # a pickle's shapes are known only once unpickled
    assert model_skeleton(str(tmp_path / "missing.safetensors")) is None
    assert model_skeleton("builtin:unknown") is None
