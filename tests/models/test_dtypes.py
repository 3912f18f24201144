"""Each part of a base model loads straight into the dtype its run keeps it in: a bf16 run's frozen weights are
bf16 from the first read, never an fp32 copy of the whole model; trained parts stay fp32; the weights own
their memory, so the file may change or go away while training runs."""
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.models import single_file, tensor_files
from library.models.builtin import build_builtin
from library.models.dtypes import PartDtypes
from library.models.loading import load_model
from library.models.saving import save_model

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(build_builtin("tiny-sd15"), path, torch.float32)
    return path


@pytest.fixture(scope="module")
def fp32_folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_model(build_builtin("tiny-sd15"), path, torch.float32)
    return path


def dtypes_of(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


def assert_weights(module: torch.nn.Module, reference: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every weight of `module` equals the fp32 reference's rounded to `dtype` (so: read once, cast once)."""
    expected = reference.state_dict()
    for name, tensor in module.state_dict().items():
        want = expected[name].to(dtype) if expected[name].is_floating_point() else expected[name]
        assert torch.equal(tensor, want), name


def mapped(path: Path) -> bool:
    return any(str(path) in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_a_bf16_run_reads_frozen_parts_as_bf16_and_the_trained_unet_as_fp32(fp32_file, monkeypatch):
    reference = load_model(str(fp32_file))
    read: dict[str, torch.Tensor] = {}

    def recording(path, dtypes):
        tensors = tensor_files.read_safetensors(path, dtypes)
        read.update(tensors)
        return tensors

    monkeypatch.setattr(single_file, "read_safetensors", recording)
    parts = load_model(str(fp32_file), dtypes=PartDtypes.for_run(BF16, {"unet"}))
    assert dtypes_of(parts.unet) == {torch.float32}
    assert dtypes_of(parts.text_encoder) == {BF16} and dtypes_of(parts.vae) == {BF16}
    assert_weights(parts.unet, reference.unet, torch.float32)
    assert_weights(parts.text_encoder, reference.text_encoder, BF16)
    assert_weights(parts.vae, reference.vae, BF16)
    # what the loader materialised: the UNet in fp32, everything else only ever in bf16 (no fp32 copy of it)
    fp32_keys = {k for k, t in read.items() if t.dtype == torch.float32}
    assert fp32_keys and all(k.startswith("model.diffusion_model.") for k in fp32_keys)
    file_floats = {k: t for k, t in load_file(str(fp32_file)).items() if t.is_floating_point()}
    frozen_bytes = sum(t.numel() * 2 for k, t in file_floats.items() if not k.startswith("model.diffusion_model."))
    unet_bytes = sum(t.nbytes for k, t in file_floats.items() if k.startswith("model.diffusion_model."))
    assert sum(t.nbytes for t in read.values() if t.is_floating_point()) <= unet_bytes + frozen_bytes


@pytest.mark.parametrize("source", ["single_file", "folder"])
def test_loaded_weights_survive_the_file_being_overwritten(source, fp32_file, fp32_folder, tmp_path):
    """fp32 weights would otherwise be views into the mapped file: a changed file would change the model."""
    import shutil

    if source == "single_file":
        path = tmp_path / "copy.safetensors"
        shutil.copy(fp32_file, path)
    else:
        path = tmp_path / "copy"
        shutil.copytree(fp32_folder, path)
    parts = load_model(str(path))
    copies = [{k: v.clone() for k, v in module.state_dict().items()} for module in parts.networks()]
    if sys.platform.startswith("linux"):
        assert not mapped(path), "the loaded model keeps the weights file mapped"
    for weights in ([path] if path.is_file() else sorted(path.rglob("*.safetensors"))):
        with open(weights, "r+b") as handle:  # in place: the same inode any mapping would still see
            size = handle.seek(0, 2)
            handle.seek(0)
            handle.write(b"\xff" * size)
    for module, copy in zip(parts.networks(), copies):
        assert all(torch.equal(tensor, copy[name]) for name, tensor in module.state_dict().items())


def test_textual_inversion_reads_the_token_embeddings_exactly(fp32_file, fp32_folder):
    reference = load_model(str(fp32_file))
    dtypes = PartDtypes.for_run(BF16, {"token_embeddings"})
    for path in (str(fp32_file), str(fp32_folder), "builtin:tiny-sd15"):
        parts = load_model(path, dtypes=dtypes)
        embedding = parts.text_encoder.get_input_embeddings().weight
        assert embedding.dtype == torch.float32
        assert torch.equal(embedding, reference.text_encoder.get_input_embeddings().weight)
        others = {p.dtype for p in parts.text_encoder.parameters() if p is not embedding}
        assert others == {BF16} and dtypes_of(parts.unet) == {BF16}


def test_a_diffusers_folder_loads_each_part_in_its_dtype_without_keeping_the_files_mapped(fp32_folder):
    reference = load_model(str(fp32_folder))
    parts = load_model(str(fp32_folder), dtypes=PartDtypes.for_run(BF16, {"unet", "text_encoders"}))
    assert dtypes_of(parts.unet) == {torch.float32} and dtypes_of(parts.text_encoder) == {torch.float32}
    assert dtypes_of(parts.vae) == {BF16}
    assert_weights(parts.vae, reference.vae, BF16)
    assert_weights(parts.unet, reference.unet, torch.float32)
    if sys.platform.startswith("linux"):
        assert not mapped(fp32_folder)


def test_the_vae_never_runs_in_fp16_unless_its_config_allows_it():
    half = PartDtypes.uniform(torch.float16)
    assert half.vae_for({"force_upcast": True}) == torch.float32
    assert half.vae_for({}) == torch.float32  # SD1/SD2 VAE configs: diffusers' default is to upcast
    assert half.vae_for({"force_upcast": False}) == torch.float16  # an fp16-fix VAE
    assert PartDtypes.uniform(BF16).vae_for({"force_upcast": True}) == BF16  # bf16 has fp32's range
    assert PartDtypes.for_run(BF16, {"vae"}).vae_for({}) == torch.float32  # DreamBooth saves its VAE
    with pytest.raises(ValueError, match="unknown model parts"):
        PartDtypes.for_run(BF16, {"text_encoder"})


def test_reading_in_chunks_returns_what_the_file_holds(fp32_file, monkeypatch):
    monkeypatch.setattr(tensor_files, "CHUNK_BYTES", 1 << 16)  # reopen the file every 64 KiB
    everything = load_file(str(fp32_file))
    read = tensor_files.read_safetensors(fp32_file, dict.fromkeys(everything, torch.float32))
    assert read.keys() == everything.keys()
    assert all(torch.equal(read[k], everything[k]) for k in everything)
