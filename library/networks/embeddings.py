"""Textual-inversion embeddings: new tokens in the tokenizer, their vectors, and the files other tools load.

Files: A1111 `.pt` (`string_to_param`), kohya `.safetensors` (`emb_params`), diffusers `{token: tensor}`
and A1111's PNG `sd-ti-embedding` text chunk. SDXL embeddings hold one set of vectors per text encoder,
`{"clip_l": [n, 768], "clip_g": [n, 1280]}` (safetensors, as sd-scripts writes them and A1111, ComfyUI and
diffusers read them); A1111's `.pt` layout has no place for a second set. A multi-vector embedding named
`kiln` is the tokens `kiln kiln_1 kiln_2 ...` (diffusers' convention); prompts name it once and
`expand_name` spells it out.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from safetensors import safe_open
from safetensors.torch import save_file

from library.errors import UserError
from library.atomic import write_atomically
from library.safe_load import UnreadableTensorFile, load_weights_only
from library.networks.embedding_names import name_problem, token_names, vocabulary_problem

MAX_VECTORS = 75  # the 77-token window minus the start and end tokens
PNG_CHUNK = "sd-ti-embedding"
_PT_TOKEN_ID = 265  # the id A1111 writes in string_to_token; nothing reads it, but tools expect the key


class EmbeddingError(UserError, ValueError):
    """An embedding file or token problem, with the path or name and what to do."""


@dataclass
class Embedding:
    """One embedding: its name (the trigger word) and vectors [n, dim], plus the A1111 bookkeeping fields.
    A two-encoder (SDXL) embedding also has `per_encoder`, its vectors by file key ({"clip_l", "clip_g"});
    `vectors` is then the first of them."""

    name: str
    vectors: torch.Tensor
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    per_encoder: dict[str, torch.Tensor] | None = None

    @classmethod
    def of_encoders(cls, name: str, tensors: dict[str, torch.Tensor], step: int | None = None,
                    sd_checkpoint_name: str | None = None) -> "Embedding":
        """An embedding from {file key: vectors}: one key ("emb_params") is a one-encoder embedding."""
        if len(tensors) == 1:
            return cls(name, next(iter(tensors.values())), step, None, sd_checkpoint_name)
        return cls(name, next(iter(tensors.values())), step, None, sd_checkpoint_name, dict(tensors))

    def tensors_for(self, keys: list[str]) -> list[torch.Tensor]:
        """The vectors for text encoders whose file keys are `keys` (TextEncoderSlot.embedding_key), in order;
        EmbeddingError when the embedding was made for another number of text encoders."""
        if self.per_encoder is None:
            if len(keys) == 1:
                return [self.vectors]
            raise EmbeddingError(f"{self.name}: a one-text-encoder (SD 1.x/2.x) embedding; this model has "
                                 f"{len(keys)} text encoders ({', '.join(keys)}), so it needs an embedding trained "
                                 "for it")
        missing = [key for key in keys if key not in self.per_encoder]
        if missing:
            raise EmbeddingError(f"{self.name}: holds {', '.join(self.per_encoder)} but this model's text encoders "
                                 f"need {', '.join(keys)}: an embedding of another model family")
        return [self.per_encoder[key] for key in keys]

    def checksum_values(self) -> torch.Tensor:
        """Every vector value in one tensor (what an `.optim` checksum covers)."""
        if self.per_encoder is None:
            return self.vectors
        return torch.cat([v.reshape(-1) for v in self.per_encoder.values()])

    def a1111_dict(self) -> dict:
        """The dict A1111 saves in `.pt` files and in the PNG chunk; for SDXL its `clip_l`/`clip_g` layout (A1111
        reads a chunk's dict like a file's)."""
        vectors = dict(self.per_encoder) if self.per_encoder else {
            "string_to_token": {"*": _PT_TOKEN_ID}, "string_to_param": {"*": self.vectors}}
        return {
            **vectors,
            "name": self.name,
            "step": self.step,
            "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name,
        }


# ---------------------------------------------------------------------------------------------- tokens


def add_tokens(tokenizer, text_encoder, name: str, vectors: int) -> list[int]:
    """Add the embedding's tokens to the tokenizer and rows to the text encoder's embedding matrix.
    Existing rows are copied bitwise; the new rows are zero until the caller sets them."""
    problem = name_problem(name) or vocabulary_problem(tokenizer.get_vocab(), name, vectors)
    if problem:
        raise EmbeddingError(problem)
    names = token_names(name, vectors)
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    # mean_resizing would draw the new rows from the old ones' covariance: slow, random and overwritten anyway
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[ids] = 0
    return ids


def init_vectors(tokenizer, text_encoder, init_text: str, vectors: int) -> tuple[torch.Tensor, str]:
    """Starting vectors [vectors, dim] and a line describing them.

    As A1111 does: the init text's token embeddings are spread across the vectors (vector i copies token
    i * tokens // vectors, so one token fills every vector); an empty init text gives zeros."""
    weight = text_encoder.get_input_embeddings().weight
    vec = torch.zeros(vectors, weight.shape[1], dtype=torch.float32)
    if not init_text.strip():
        return vec, "zeros (embedding.init_text is empty)"
    ids = tokenizer(init_text, add_special_tokens=False).input_ids
    if not ids:
        return vec, f"zeros (embedding.init_text {init_text!r} has no tokens)"
    rows = weight.detach()[ids].float().cpu()
    picks = [i * len(ids) // vectors for i in range(vectors)]
    vec[:] = rows[picks]
    words = tokenizer.convert_ids_to_tokens(ids)
    used = ", ".join(words[p].removesuffix("</w>") for p in picks)
    return vec, f"from {init_text!r} ({len(ids)} token(s); vectors copy: {used})"


# ---------------------------------------------------------------------------------------------- files




def save_embedding(embedding: Embedding, path: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write `.pt` (A1111) or `.safetensors` (`emb_params`, as kohya; SDXL `clip_l` + `clip_g`; A1111, ComfyUI and
    diffusers load both)."""
    path = Path(path)
    cast = lambda t: t.detach().to("cpu", dtype).contiguous()  # noqa: E731
    tensors = {k: cast(v) for k, v in (embedding.per_encoder or {"emb_params": embedding.vectors}).items()}
    vectors = next(iter(tensors.values()))
    stored = Embedding(embedding.name, vectors, embedding.step, embedding.sd_checkpoint, embedding.sd_checkpoint_name,
                       tensors if embedding.per_encoder else None)
    suffix = path.suffix.lower()
    if suffix == ".pt":
        if stored.per_encoder:
            raise EmbeddingError(f"{path}: A1111's .pt embedding holds one text encoder's vectors and has no form for "
                                 f"SDXL's two ({', '.join(tensors)}); save it as .safetensors (embedding.format = "
                                 "\"safetensors\"), the SDXL layout A1111, ComfyUI and diffusers load")
        write_atomically(path, lambda tmp: torch.save(stored.a1111_dict(), tmp))
    elif suffix == ".safetensors":
        metadata = {"name": stored.name, "step": str(stored.step or 0), "vectors": str(vectors.shape[0]),
                    "sd_checkpoint_name": stored.sd_checkpoint_name or ""}
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    else:
        raise EmbeddingError(f"{path}: embeddings are saved as .pt or .safetensors, not {path.suffix!r}")


def _vectors(value, path: Path) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise EmbeddingError(f"{path}: the embedding holds {type(value).__name__}, not a tensor")
    return (value.unsqueeze(0) if value.dim() == 1 else value).detach().float().cpu()


def embedding_from_dict(data: dict, path: Path, default_name: str) -> Embedding:
    """An Embedding from any of the dict layouts: A1111, kohya `emb_params`, diffusers `{token: tensor}`."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        if len(params) != 1:
            raise EmbeddingError(f"{path}: holds {len(params)} embeddings; one per file is supported")
        return Embedding(str(data.get("name") or default_name), _vectors(next(iter(params.values())), path),
                         data.get("step"), data.get("sd_checkpoint"), data.get("sd_checkpoint_name"))
    if "clip_l" in data or "clip_g" in data:  # SDXL (sd-scripts reads a file with either half)
        halves = {key: _vectors(data[key], path) for key in ("clip_l", "clip_g") if key in data}
        if len({t.shape[0] for t in halves.values()}) != 1:
            raise EmbeddingError(f"{path}: clip_l and clip_g hold different numbers of vectors")
        return Embedding(str(data.get("name") or default_name), next(iter(halves.values())), data.get("step"),
                         data.get("sd_checkpoint"), data.get("sd_checkpoint_name"), halves)
    if "emb_params" in data:
        return Embedding(default_name, _vectors(data["emb_params"], path))
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:
        token, value = next(iter(tensors.items()))
        return Embedding(token, _vectors(value, path))
    raise EmbeddingError(f"{path}: not a textual-inversion embedding (keys: {', '.join(map(str, data)) or 'none'})")


def load_embedding(path: str | Path) -> Embedding:
    """Read an embedding from `.pt`/`.bin` (A1111, diffusers), `.safetensors` (kohya, diffusers) or a PNG/WebP
    with an `sd-ti-embedding` chunk. Like A1111, a file's name is the trigger word (a PNG carries its own)."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"embedding file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".bin"):
        try:
            data = load_weights_only(path)
        except UnreadableTensorFile as err:
            raise EmbeddingError(f"{err}; if it is an old A1111 embedding, load it in A1111 once and save it "
                                 "again, or use its .safetensors version") from None
        if isinstance(data, torch.Tensor):
            data = {path.stem: data}
        embedding = embedding_from_dict(data, path, path.stem)
        embedding.name = path.stem if "string_to_param" in data else embedding.name
        return embedding
    if suffix == ".safetensors":
        with safe_open(str(path), "pt") as handle:
            data = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
        embedding = embedding_from_dict(data, path, path.stem)
        if "emb_params" in data or "clip_l" in data or "clip_g" in data:
            embedding.step = int(metadata["step"]) if metadata.get("step", "").isdigit() else None
            embedding.sd_checkpoint_name = metadata.get("sd_checkpoint_name") or None
        return embedding
    if suffix in (".png", ".webp"):
        data = read_png_embedding(path)
        if data is None:
            raise EmbeddingError(f"{path}: the image has no '{PNG_CHUNK}' text chunk, so it holds no embedding")
        return embedding_from_dict(data, path, path.stem)
    raise EmbeddingError(f"{path}: unknown embedding file type {path.suffix!r}; use .pt, .safetensors or .png")


# ---------------------------------------------------------------------------------------------- PNG chunk


def embedding_to_b64(data: dict) -> str:
    """A1111's PNG text: the embedding dict as JSON (tensors as {"TORCHTENSOR": nested list}), base64."""
    def encode(value):
        if isinstance(value, torch.Tensor):
            return {"TORCHTENSOR": value.detach().cpu().tolist()}
        raise TypeError(f"cannot store {type(value).__name__} in an embedding chunk")

    return base64.b64encode(json.dumps(data, default=encode).encode("utf-8")).decode("ascii")


def embedding_from_b64(text: str | bytes) -> dict:
    """Inverse of embedding_to_b64 (tensors come back as float32, as A1111 casts them on load)."""
    def decode(obj: dict):
        return torch.tensor(obj["TORCHTENSOR"], dtype=torch.float32) if "TORCHTENSOR" in obj else obj

    return json.loads(base64.b64decode(text), object_hook=decode)


def save_png(image: Image.Image, path: Path, embedding: Embedding | None = None, parameters: str = "") -> None:
    """Write a PNG, with the embedding in an `sd-ti-embedding` chunk and/or A1111's `parameters` text."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    if embedding is not None:
        info.add_text(PNG_CHUNK, embedding_to_b64(embedding.a1111_dict()))
    write_atomically(Path(path), lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_embedding(path: Path) -> dict | None:
    """The embedding dict in an image's `sd-ti-embedding` chunk, or None when it has none."""
    with Image.open(path) as image:
        chunks = getattr(image, "text", None) or image.info  # PNG text chunks; other formats keep them in info
        text = chunks.get(PNG_CHUNK)
    return embedding_from_b64(text) if text else None


# ---------------------------------------------------------------------------------------------- optimizer state


def a1111_checksum(vectors: torch.Tensor) -> str:
    """A1111's 4-hex-digit checksum of an embedding's vectors (stored in `.optim` files to pair them)."""
    value = 0
    for v in (vectors.detach().float().cpu().reshape(-1) * 100).tolist():
        value = (value * 281 ^ int(v) * 997) & 0xFFFFFFFF
    return f"{value & 0xFFFF:04x}"


def optim_path(embedding_path: Path) -> Path:
    return Path(f"{embedding_path}.optim")


def save_optimizer_state(embedding_path: Path, vectors: torch.Tensor, state: dict, optimizer_name: str) -> None:
    """`<file>.optim` beside an embedding, as A1111 writes it (plus the optimizer's name, which A1111 ignores)."""
    data = {"hash": a1111_checksum(vectors), "optimizer_state_dict": state, "optimizer_name": optimizer_name}
    write_atomically(optim_path(embedding_path), lambda tmp: torch.save(data, tmp))


def load_optimizer_state(embedding_path: Path, vectors: torch.Tensor, optimizer_name: str) -> tuple[dict | None, str]:
    """(state, message). The state is refused (None) when `<file>.optim` is missing, was written for other
    vectors (A1111's checksum differs) or by another optimizer; the message says which and what happens."""
    path = optim_path(embedding_path)
    if not path.is_file():
        return None, f"no optimizer state beside {embedding_path} ({path.name}): the optimizer starts fresh"
    try:
        data = load_weights_only(path)
    except UnreadableTensorFile as err:
        return None, f"{err}: the optimizer starts fresh"
    expected = a1111_checksum(vectors)
    if data.get("hash") != expected:
        return None, (f"{path} was saved with other vectors (checksum {data.get('hash')} != {expected}), so it does "
                      "not belong to this embedding: refused, the optimizer starts fresh")
    saved_by = data.get("optimizer_name", "AdamW")  # A1111 always trains embeddings with AdamW
    if saved_by != optimizer_name:
        return None, (f"{path} holds {saved_by} state but this run uses {optimizer_name}: refused, the optimizer "
                      "starts fresh")
    return data.get("optimizer_state_dict"), f"loaded the optimizer state from {path}"
