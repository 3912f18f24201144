"""tools/resize_lora.py: the resized LoRA applies the best rank-r approximation (truncated SVD) of what the file
applied, dynamic modes keep the ranks their definitions imply, layout and metadata are kept, mistakes are one line."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.models.builtin import build_builtin
from library.networks.lora import lora_delta
from library.networks.merge import merge_network
from library.networks.targets import text_encoder_targets, unet_targets
from library.training.checkpoints import atomic_save_safetensors

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import resize_lora  # noqa: E402

METADATA = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4",
            "ss_network_args": json.dumps({"conv_dim": "6", "conv_alpha": "3"}), "ss_output_name": "style",
            "ss_training_comment": "trained on pots", "sshs_model_hash": "stale"}


@pytest.fixture(scope="module")
def tiny():
    return build_builtin("tiny-sd15")


def random_locon(parts, rank: int = 8, conv_rank: int = 6) -> dict[str, torch.Tensor]:
    """A kohya LoCon file on every UNet target (3x3 convs at conv_rank) and text-encoder target, in fp16."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    targets = [(parts.unet, t) for t in unet_targets(parts, with_conv=True)]
    targets += [(parts.text_encoder, t) for t in text_encoder_targets(parts)]
    for model, target in targets:
        weight = model.get_submodule(target.path).weight
        r = conv_rank if target.is_conv3x3 else rank
        tail = tuple(weight.shape[2:])
        out[f"{target.kohya_name}.lora_down.weight"] = torch.randn((r, weight.shape[1], *tail), generator=generator)
        out[f"{target.kohya_name}.lora_up.weight"] = torch.randn(
            (weight.shape[0], r, 1, 1) if tail else (weight.shape[0], r), generator=generator) * 0.1
        out[f"{target.kohya_name}.alpha"] = torch.tensor(r / 2)
    return {k: v.half() for k, v in out.items()}


def module_delta(weights, name):
    return lora_delta(weights[f"{name}.lora_down.weight"], weights[f"{name}.lora_up.weight"],
                      float(weights[f"{name}.alpha"]))


def truncated_svd(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation of delta (Eckart–Young), computed here on its own."""
    u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1).double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape).float()


def test_fixed_rank_is_the_truncated_svd_and_keeps_layout_and_metadata(tiny, tmp_path, capsys):
    source = random_locon(tiny)
    atomic_save_safetensors(source, tmp_path / "in.safetensors", METADATA)
    out = tmp_path / "out.safetensors"
    assert resize_lora.main([str(tmp_path / "in.safetensors"), str(out), "--rank", "3", "--conv-rank", "2",
                             "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    resized = load_file(str(out))
    assert resized.keys() == source.keys() and all(v.dtype == torch.float16 for v in resized.values())
    names = sorted(k.removesuffix(".alpha") for k in source if k.endswith(".alpha"))
    for name in names:
        conv = source[f"{name}.lora_down.weight"].dim() == 4 and source[f"{name}.lora_down.weight"].shape[2] == 3
        rank = 2 if conv else 3
        assert resized[f"{name}.lora_down.weight"].shape[0] == rank
        assert resized[f"{name}.lora_down.weight"].shape[1:] == source[f"{name}.lora_down.weight"].shape[1:]
        # alpha/rank is kept: the scale every tool applies does not change
        assert float(resized[f"{name}.alpha"]) == pytest.approx(0.5 * rank)
        expected = truncated_svd(module_delta({k: v.float() for k, v in source.items()}, name), rank)
        got = module_delta({k: v.float() for k, v in resized.items()}, name)
        assert torch.allclose(got, expected, atol=2e-3 * expected.abs().max().item()), name
        assert f"{name}: rank {6 if conv else 8} → {rank}, alpha {0.5 * rank:g}; retained" in printed
    assert "average Frobenius norm retained:" in printed
    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "1.5"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert meta["ss_training_comment"] == "dimension is resized from 8 to 3 (conv: 2); trained on pots"
    assert meta["ss_output_name"] == "style" and "sshs_model_hash" not in meta  # a hash of the old tensors
    merged = build_builtin("tiny-sd15")
    assert merge_network(merged, {k: v.float() for k, v in resized.items()}) == []  # still a kohya LoRA


def known_spectrum_file(singular_values: list[float], alpha: float) -> dict[str, torch.Tensor]:
    """One Linear module 24 → 16 whose up·down has exactly these singular values."""
    generator = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(16, len(singular_values), generator=generator))
    v, _ = torch.linalg.qr(torch.randn(24, len(singular_values), generator=generator))
    s = torch.tensor(singular_values)
    return {"lora_unet_m.lora_down.weight": v.T.contiguous(), "lora_unet_m.lora_up.weight": u * s,
            "lora_unet_m.alpha": torch.tensor(alpha)}


# S = 8, 4, 2, 1, 0.5, 0.25 (ΣS = 15.75, ΣS² = 85.3125)
@pytest.mark.parametrize("options, rank", [
    (["--dynamic", "sv_ratio", "--dynamic-param", "5"], 3),  # above 8/5 = 1.6: 8, 4, 2
    (["--dynamic", "sv_cumulative", "--dynamic-param", "0.9"], 4),  # 14/15.75 = 0.889 < 0.9 ≤ 15/15.75
    (["--dynamic", "sv_fro", "--dynamic-param", "0.99"], 3),  # √(84/85.3125) = 0.9923 ≥ 0.99 > √(80/85.3125)
    (["--dynamic", "sv_cumulative", "--dynamic-param", "0.9", "--rank", "2"], 2),  # capped by --rank
    (["--rank", "5"], 5),
])
def test_dynamic_modes_keep_the_ranks_their_definitions_imply(tmp_path, capsys, options, rank):
    source = known_spectrum_file([8, 4, 2, 1, 0.5, 0.25], alpha=3.0)
    atomic_save_safetensors(source, tmp_path / "in.safetensors", METADATA)
    out = tmp_path / "out.safetensors"
    assert resize_lora.main([str(tmp_path / "in.safetensors"), str(out), *options]) == 0
    resized = load_file(str(out))
    assert resized["lora_unet_m.lora_down.weight"].shape == (rank, 24)
    assert float(resized["lora_unet_m.alpha"]) == pytest.approx(3.0 / 6 * rank)
    expected = truncated_svd(module_delta(source, "lora_unet_m"), rank)
    assert torch.allclose(module_delta(resized, "lora_unet_m"), expected, atol=1e-5)
    kept = [8, 4, 2, 1, 0.5, 0.25][:rank]
    fro = (sum(x * x for x in kept) / 85.3125) ** 0.5
    assert f"retained {fro:.1%} of the Frobenius norm, {sum(kept) / 15.75:.1%} of sum(S)" in capsys.readouterr().out
    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
    dynamic = "--dynamic" in options
    assert meta["ss_network_dim"] == ("Dynamic" if dynamic else str(rank))
    assert meta["ss_training_comment"].startswith("Dynamic resize with" if dynamic else "dimension is resized")


@pytest.mark.parametrize("options, code, message", [
    ([], 2, "give --rank N (a fixed rank) or --dynamic METHOD --dynamic-param X"),
    (["--dynamic", "sv_fro"], 2, "--dynamic sv_fro needs --dynamic-param"),
    (["--dynamic", "sv_fro", "--dynamic-param", "1.5"], 2, "0 < X ≤ 1"),
    (["--dynamic", "sv_ratio", "--dynamic-param", "0.5"], 2, "X ≥ 1"),
    (["--rank", "0"], 2, "--rank 0: a rank is at least 1"),
    (["--rank", "8"], 1, "already has rank ≤ 8"),
])
def test_bad_options_are_one_line_and_write_nothing(tmp_path, capsys, options, code, message):
    atomic_save_safetensors(known_spectrum_file([3, 2, 1], 1.0), tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    assert resize_lora.main([str(tmp_path / "in.safetensors"), str(out), *options]) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_refuses_other_kinds_and_existing_output(tmp_path, capsys):
    loha = {"lora_unet_m.hada_w1_a": torch.zeros(4, 2), "lora_unet_m.hada_w1_b": torch.zeros(2, 4),
            "lora_unet_m.hada_w2_a": torch.zeros(4, 2), "lora_unet_m.hada_w2_b": torch.zeros(2, 4)}
    atomic_save_safetensors(loha, tmp_path / "loha.safetensors")
    assert resize_lora.main([str(tmp_path / "loha.safetensors"), str(tmp_path / "o.safetensors"), "--rank", "1"]) == 1
    assert "it is a loha file; resize_lora.py reduces kohya LoRA/LoCon files" in capsys.readouterr().err
    atomic_save_safetensors(known_spectrum_file([3, 2, 1], 1.0), tmp_path / "in.safetensors")
    (tmp_path / "o.safetensors").write_bytes(b"earlier")
    assert resize_lora.main([str(tmp_path / "in.safetensors"), str(tmp_path / "o.safetensors"), "--rank", "1"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "o.safetensors").read_bytes() == b"earlier"
    assert resize_lora.main([str(tmp_path / "in.safetensors"), str(tmp_path / "o.safetensors"), "--rank", "1",
                             "--overwrite"]) == 0
