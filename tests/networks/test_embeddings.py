"""Embedding tokens and files: trigger-name checks, A1111 init, name expansion, the formats A1111/diffusers
load (.pt, .safetensors, PNG chunk) and A1111's .optim pairing."""
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from library.models.conditioning import encode_text, tokenize
from library.networks.embeddings import (Embedding, EmbeddingError, a1111_checksum, add_tokens, init_vectors, load_embedding, load_optimizer_state, read_png_embedding, save_embedding, save_optimizer_state, save_png)
from library.networks.embedding_names import expand_name, name_problem, vocabulary_problem
from library.models.builtin import build_builtin


@pytest.fixture(scope="module")
def tiny():
    return build_builtin("tiny-sd15")


def fresh():
    return build_builtin("tiny-sd15")


def test_trigger_names_are_checked(tiny):
    assert "one word" in name_problem("kiln pot")
    assert "letter" in name_problem("1234")
    assert name_problem("kiln-pot_2") is None
    problem = vocabulary_problem(tiny.tokenizer.get_vocab(), "Cat", 1)
    assert "already a token" in problem and "'cat" in problem
    assert vocabulary_problem(tiny.tokenizer.get_vocab(), "kilnpot", 3) is None


def test_add_tokens_adds_rows_and_refuses_a_second_time():
    parts = fresh()
    before = parts.text_encoder.get_input_embeddings().weight.detach().clone()
    ids = add_tokens(parts.tokenizer, parts.text_encoder, "kilnpot", 2)
    weight = parts.text_encoder.get_input_embeddings().weight
    assert ids == [49408, 49409] and weight.shape[0] == 49410
    assert torch.equal(weight[:49408], before)  # the copy is bitwise
    assert tokenize(parts.tokenizer, ["a KilnPot kilnpot_1"])[0, 1:4].tolist() == [320, 49408, 49409]
    with pytest.raises(EmbeddingError, match="already a token"):
        add_tokens(parts.tokenizer, parts.text_encoder, "kilnpot", 1)


def test_expand_name_spells_out_vectors_case_insensitively():
    text = "a KilnPot, kilnpot_1 and kilnpots by kilnpot."
    assert expand_name(text, "kilnpot", 1) == text
    assert expand_name(text, "kilnpot", 3) == ("a kilnpot kilnpot_1 kilnpot_2, kilnpot_1 and kilnpots by "
                                              "kilnpot kilnpot_1 kilnpot_2.")


def test_init_text_is_spread_across_vectors_like_a1111(tiny):
    weight = tiny.text_encoder.get_input_embeddings().weight.detach()
    ids = tiny.tokenizer("a kiln pot", add_special_tokens=False).input_ids
    assert len(ids) == 3
    vec, note = init_vectors(tiny.tokenizer, tiny.text_encoder, "a kiln pot", 2)
    assert torch.equal(vec, weight[[ids[0], ids[1]]])  # vector i copies token i*3//2
    vec, _ = init_vectors(tiny.tokenizer, tiny.text_encoder, "a kiln pot", 4)
    assert torch.equal(vec, weight[[ids[0], ids[0], ids[1], ids[2]]])
    vec, note = init_vectors(tiny.tokenizer, tiny.text_encoder, "pot", 3)
    assert torch.equal(vec, weight[[ids[2]] * 3]) and "pot, pot, pot" in note
    vec, note = init_vectors(tiny.tokenizer, tiny.text_encoder, "", 2)
    assert torch.count_nonzero(vec) == 0 and "zeros" in note


def sample_embedding(vectors=2, dim=32) -> Embedding:
    values = torch.randn(vectors, dim, generator=torch.Generator().manual_seed(1)) * 0.3
    return Embedding("kilnpot", values, 120, None, "tiny-sd15")


def test_pt_file_has_the_a1111_layout_and_round_trips(tmp_path):
    embedding = sample_embedding()
    path = tmp_path / "kilnpot.pt"
    save_embedding(embedding, path)
    data = torch.load(path, weights_only=True)
    assert data["string_to_token"] == {"*": 265}
    assert torch.equal(data["string_to_param"]["*"], embedding.vectors)
    assert (data["name"], data["step"], data["sd_checkpoint_name"]) == ("kilnpot", 120, "tiny-sd15")
    renamed = tmp_path / "kiln-v2.pt"
    path.rename(renamed)
    loaded = load_embedding(renamed)
    assert loaded.name == "kiln-v2" and loaded.step == 120  # A1111 takes the trigger from the file name
    assert torch.equal(loaded.vectors, embedding.vectors)


def test_safetensors_and_diffusers_files_load(tmp_path):
    embedding = sample_embedding()
    path = tmp_path / "kilnpot.safetensors"
    save_embedding(embedding, path, torch.float16)
    assert list(load_file(str(path))) == ["emb_params"]
    loaded = load_embedding(path)
    assert loaded.name == "kilnpot" and loaded.step == 120
    assert torch.equal(loaded.vectors, embedding.vectors.half().float())
    save_file({"<kiln>": embedding.vectors[0]}, str(tmp_path / "learned_embeds.safetensors"))  # diffusers, 1-D
    assert load_embedding(tmp_path / "learned_embeds.safetensors").vectors.shape == (1, 32)
    save_file({"clip_l": embedding.vectors, "clip_g": torch.zeros(2, 64)}, str(tmp_path / "xl.safetensors"))
    xl = load_embedding(tmp_path / "xl.safetensors")  # SDXL: loads, but only into a two-encoder model
    assert set(xl.per_encoder) == {"clip_l", "clip_g"} and xl.tensors_for(["clip_l", "clip_g"])[1].shape == (2, 64)
    with pytest.raises(EmbeddingError, match="2 text encoders|one-text-encoder|another model family"):
        xl.tensors_for(["emb_params"])
    with pytest.raises(EmbeddingError, match="one-text-encoder"):
        embedding.tensors_for(["clip_l", "clip_g"])
    with pytest.raises(EmbeddingError, match="not found"):
        load_embedding(tmp_path / "missing.pt")


def test_png_chunk_round_trips_bitwise(tmp_path):
    embedding = sample_embedding(3)
    path = tmp_path / "kilnpot-120.png"
    save_png(Image.new("RGB", (16, 16), (200, 100, 50)), path, embedding, parameters="a kilnpot\nSteps: 2")
    with Image.open(path) as image:
        assert image.text["parameters"] == "a kilnpot\nSteps: 2"
    data = read_png_embedding(path)
    assert data["string_to_token"] == {"*": 265} and data["step"] == 120
    loaded = load_embedding(path)
    assert loaded.name == "kilnpot"  # a PNG carries its own name
    assert torch.equal(loaded.vectors, embedding.vectors)
    save_png(Image.new("RGB", (8, 8)), tmp_path / "plain.png")
    with pytest.raises(EmbeddingError, match="sd-ti-embedding"):
        load_embedding(tmp_path / "plain.png")


def a1111_const_hash(vec: torch.Tensor) -> str:
    """A1111's Embedding.checksum as written there: iterate tensor elements, int() each."""
    r = 0
    for v in vec.reshape(-1) * 100:
        r = (r * 281 ^ int(v) * 997) & 0xFFFFFFFF
    return f"{r & 0xffff:04x}"


def test_checksum_matches_a1111():
    for seed in range(3):
        vec = torch.randn(2, 32, generator=torch.Generator().manual_seed(seed))
        assert a1111_checksum(vec) == a1111_const_hash(vec)


def test_optimizer_state_pairs_with_its_vectors(tmp_path):
    vec = torch.nn.Parameter(sample_embedding().vectors.clone())
    optimizer = torch.optim.AdamW([vec], lr=0.005, weight_decay=0.0)
    vec.grad = torch.ones_like(vec)
    optimizer.step()
    path = tmp_path / "kilnpot.pt"
    save_optimizer_state(path, vec.detach(), optimizer.state_dict(), "AdamW")
    state, message = load_optimizer_state(path, vec.detach(), "AdamW")
    assert torch.equal(state["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]), message
    state, message = load_optimizer_state(path, vec.detach() + 0.5, "AdamW")
    assert state is None and "saved with other vectors" in message and "refused" in message
    state, message = load_optimizer_state(path, vec.detach(), "Lion")
    assert state is None and "holds AdamW state" in message
    state, message = load_optimizer_state(tmp_path / "other.pt", vec.detach(), "AdamW")
    assert state is None and "starts fresh" in message


def prompt_output(parts, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return encode_text(parts.text_encoder, tokenize(parts.tokenizer, [prompt]))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_diffusers_load_textual_inversion_reads_our_files(tmp_path, suffix):
    embedding = sample_embedding(2)
    path = tmp_path / f"kilnpot{suffix}"
    save_embedding(embedding, path)
    parts = fresh()
    pipe = parts.pipeline()
    prompt = "a photo of kilnpot"
    before = prompt_output(parts, pipe.maybe_convert_prompt(prompt, parts.tokenizer))
    pipe.load_textual_inversion(str(path), token=None if suffix == ".pt" else "kilnpot")
    expanded = pipe.maybe_convert_prompt(prompt, parts.tokenizer)
    assert expanded == "a photo of kilnpot kilnpot_1"
    ids = parts.tokenizer.convert_tokens_to_ids(["kilnpot", "kilnpot_1"])
    assert torch.equal(parts.text_encoder.get_input_embeddings().weight[ids].detach(), embedding.vectors)
    after = prompt_output(parts, expanded)
    assert not torch.allclose(before, after, atol=1e-3)
