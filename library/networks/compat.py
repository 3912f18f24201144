"""Is an add-on file made for this model? Network files (LoRA, LoCon, ...) and embeddings are checked against a
model's family and widths — from their metadata (`ss_base_model_version`) and tensor shapes — so a file made
for another family is refused with the family it was made for, instead of failing with a shape error."""
from __future__ import annotations

from pathlib import Path

from library.errors import UserError
from library.models.families import FAMILIES
from library.models.header import ModelHeader


class NetworkFileError(UserError, ValueError):
    """A file that is not a network Kiln can apply to this model; the message says which and why."""


def read_network_metadata(path: str | Path) -> dict[str, str]:
    """A network file's metadata only (the header; no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise NetworkFileError(f"{path} is not a readable .safetensors LoRA file ({err})") from None


def _made_for(version: str) -> str:
    family = next((f for f in FAMILIES if f.claims_base_model_version(version)), None)
    return family.label if family else f"another model (ss_base_model_version {version})"


def network_file_problem(path: str | Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str],
                         model: ModelHeader) -> str | None:
    """None when the network file fits the model, else what is wrong, naming the family it was made for."""
    version = metadata.get("ss_base_model_version", "")
    if version and not model.family.claims_base_model_version(version):
        return (f"{path} was made for {_made_for(version)} (ss_base_model_version {version}), but the model is "
                f"{model.family.label}: use a network trained on this model's family")
    prefixes = tuple(slot.kohya_prefix for slot in model.family.text_encoders)
    foreign = sorted({key.split(".")[0] for key in shapes
                      if key.startswith("lora_te") and not key.startswith(prefixes)})
    if foreign:
        return (f"{path}: {len(foreign)} of its modules match nothing in the base model (text-encoder modules "
                f"this {model.family.label} model does not have, e.g. {foreign[0]}): it was made for another model "
                "family")
    return _width_problem(path, shapes, model)


def _width_problem(path, shapes: dict[str, tuple[int, ...]], model: ModelHeader) -> str | None:
    """LoRA input widths: cross-attention key/value projections read the text width the UNet was built for,
    text-encoder attention projections their encoder's width."""
    family = model.family
    for key, shape in shapes.items():
        if not key.endswith(".lora_down.weight") or len(shape) != 2:
            continue
        name, width = key.split(".")[0], shape[1]
        if name.endswith(("attn2_to_k", "attn2_to_v")) and model.context_dim and width != model.context_dim:
            return (f"{path}: its cross-attention modules read {width}-wide text states, this "
                    f"{family.label} model's UNet reads {model.context_dim}: it was made for another model family")
        for slot, expected in zip(family.text_encoders, model.text_widths):
            if name.startswith(slot.kohya_prefix) and name.endswith(("q_proj", "k_proj", "v_proj")) \
                    and width != expected:
                return (f"{path}: its text-encoder modules are {width} wide, this {family.label} model's are "
                        f"{expected}: it was made for another model family")
    return None


def embedding_problem(path: str | Path, width: int, model: ModelHeader) -> str | None:
    """An embedding's vectors must be as wide as the text encoder they go into."""
    if model.text_widths and width != model.text_widths[0]:
        return (f"{path} holds {width}-wide vectors, but this {model.family.label} model's text encoder is "
                f"{model.text_widths[0]} wide: the embedding was made for another model family")
    return None


def hypernetwork_problem(path: str | Path, widths: list[int], model: ModelHeader) -> str | None:
    """A hypernetwork needs a module for the model's text width; one with modules only for widths the model lacks
    was made for another family (extra widths alone are fine: A1111 offers 1024 beside SD 1.x's 768)."""
    from library.networks.hypernetwork_spec import width_problem

    return width_problem(str(path), widths, model.context_dim, model.attention_widths, model.family.label)
