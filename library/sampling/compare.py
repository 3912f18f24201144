"""compare.py's X/Y/Z plot: render one image per combination of axis values (checkpoints, LoRA multiplier,
hypernetworks and strengths, prompt search/replace, seed, CFG, steps, sampler) and lay them out in one labelled
grid, as A1111's X/Y/Z plot does, to pick the best epoch of a run."""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch

from library.models.loading import load_model
from library.models.header import header_of
from library.models.parts import ModelParts
from library.networks.compat import embedding_problem, hypernetwork_problem, network_file_problem
from library.networks.embedding_names import expand_name
from library.networks.embeddings import Embedding, add_tokens, load_embedding
from library.networks.hypernetwork import Hypernetwork, attach, load_hypernetwork
from library.networks.merge import merge_network, read_network_file, restore_weights, snapshot_weights
from library.sampling.compare_axes import Axis, CompareError, Settings, cell_label, cells
from library.sampling.grid import make_grid
from library.sampling.preview import generate, save_sample

# ---------------------------------------------------------------------------------------------- model state


class Models:
    """The current base model, loaded when a cell names another checkpoint, with LoRAs merged into a fresh copy
    of the base weights per cell (the touched weights are restored afterwards) and embeddings set as token rows."""

    def __init__(self):
        self.path: str | None = None
        self.parts: ModelParts | None = None
        self.token_ids: dict[str, list[int]] = {}
        self.embeddings: dict[str, Embedding] = {}
        self.hypernetworks: dict[str, Hypernetwork] = {}

    def load(self, settings: Settings) -> ModelParts:
        if settings.model != self.path:
            self.parts = None  # free the previous model first
            self.parts = load_model(settings.model, settings.v_parameterization, settings.config_dir or None)
            self.path, self.token_ids = settings.model, {}
        return self.parts

    def embedding(self, path: str, parts: ModelParts) -> Embedding:
        if path not in self.embeddings:
            embedding = load_embedding(path)
            if problem := embedding_problem(path, embedding.vectors.shape[1], header_of(parts)):
                raise CompareError(problem)
            self.embeddings[path] = embedding
        return self.embeddings[path]

    def hypernetwork(self, path: str, parts: ModelParts) -> Hypernetwork:
        if path not in self.hypernetworks:
            network = load_hypernetwork(path)
            if problem := hypernetwork_problem(path, network.widths, header_of(parts)):
                raise CompareError(problem)
            self.hypernetworks[path] = network
        return self.hypernetworks[path]

    @contextlib.contextmanager
    def applied(self, settings: Settings):
        """The model for `settings`, with its LoRA, hypernetwork and embedding in place; yields the prompt spec to
        render. Each is taken off again afterwards, so the next cell starts from the untouched base."""
        parts = self.load(settings)
        spec = settings.spec()
        if not (spec.width and spec.height):  # not set: the model's native size
            spec = dataclasses.replace(spec, width=spec.width or parts.native_size(),
                                       height=spec.height or parts.native_size())
        if settings.embedding:
            spec = self._set_embedding(settings, parts, spec)
        with contextlib.ExitStack() as undo:
            if settings.hypernetwork:
                network = self.hypernetwork(settings.hypernetwork, parts)
                undo.callback(attach(parts, network, settings.hypernetwork_strength).remove)
            if settings.lora:
                self._merge_lora(settings, parts, undo)
            yield parts, spec

    def _set_embedding(self, settings: Settings, parts: ModelParts, spec):
        embedding = self.embedding(settings.embedding, parts)
        token = settings.token or embedding.name
        vectors = embedding.vectors.shape[0]
        tensors = embedding.tensors_for([slot.embedding_key for slot in parts.family.text_encoders])
        ids = self.token_ids.get(token)
        if ids is None:
            ids = self.token_ids[token] = [add_tokens(tokenizer, encoder, token, vectors) for tokenizer, encoder
                                           in zip(parts.tokenizers, parts.text_encoders)][0]
        if len(ids) != vectors:
            raise CompareError(f"{settings.embedding} has {vectors} vector(s) but {token!r} was first loaded "
                               f"with {len(ids)}; compare embeddings of one run (same vector count)")
        for encoder, values in zip(parts.text_encoders, tensors):  # one set per text encoder (SDXL: two)
            weight = encoder.get_input_embeddings().weight
            with torch.no_grad():
                weight[ids] = values.to(weight.device, weight.dtype)
        return dataclasses.replace(spec, prompt=expand_name(spec.prompt, token, vectors),
                                   negative_prompt=expand_name(spec.negative_prompt, token, vectors))

    def _merge_lora(self, settings: Settings, parts: ModelParts, undo: contextlib.ExitStack) -> None:
        weights, metadata = read_network_file(settings.lora)
        shapes = {key: tuple(tensor.shape) for key, tensor in weights.items()}
        if problem := network_file_problem(settings.lora, shapes, metadata, header_of(parts)):
            raise CompareError(problem)
        saved = snapshot_weights(parts, weights)  # each cell merges onto the untouched base
        undo.callback(restore_weights, saved)
        unmatched = merge_network(parts, weights, settings.multiplier)
        if unmatched:
            print(f"note: {settings.lora}: {len(unmatched)} module(s) match nothing in this model, "
                  f"e.g. {unmatched[0]}")


# ---------------------------------------------------------------------------------------------- the plot


def render(base: Settings, axes: list[Axis | None], output_dir: Path, font_size: int | None = None) -> Path:
    """Render every cell into output_dir/cells/, the labelled grid into output_dir/grid.png; returns its path.
    Both carry their settings in PNG text chunks (`parameters` as A1111 writes it, `kiln_compare` as JSON)."""
    if base.sr is None and any(a and a.kind == "sr" for a in axes):
        search = next(a for a in axes if a and a.kind == "sr").values[0][0]
        if search not in base.prompt:
            raise CompareError(f"sr axis: the search string {search!r} is not in the prompt {base.prompt!r}")
    plan = cells(base, axes)
    models = Models()
    images = {}
    output_dir = Path(output_dir)
    # cells that share a checkpoint run together, so each full checkpoint loads once
    order = sorted(plan, key=lambda key: (plan[key].model, key[2], key[1], key[0]))
    for number, key in enumerate(order, 1):
        settings = plan[key]
        with models.applied(settings) as (parts, spec):
            image = generate(parts, spec, settings.clip_skip, settings.max_token_length)
        images[key] = image
        path = output_dir / "cells" / f"x{key[0]:02d}-y{key[1]:02d}-z{key[2]:02d}.png"
        described = {**settings.describe(), "width": spec.width, "height": spec.height, "seed": spec.seed}
        save_sample(image, path, spec, {"kiln_compare": json.dumps(described)})
        print(f"[{number}/{len(order)}] {cell_label(axes, key)}: {spec.width}x{spec.height}, seed {spec.seed}, "
              f"{spec.prompt[:60]!r}")
    labels = [(axis.labels if axis else [""]) for axis in (list(axes) + [None] * 3)[:3]]
    grid, _ = make_grid(images, *labels, font_size=font_size)
    meta = {"base": base.describe(),
            "axes": {name: {"kind": a.kind, "values": a.labels} for name, a in zip("xyz", axes) if a}}
    path = output_dir / "grid.png"
    save_sample(grid, path, base.spec(), {"kiln_compare": json.dumps(meta)})
    return path
