"""A corpus of bad configs, datasets, files and arguments run through every script and tool the way users run
them: each must end with exit code 2 and one `error:` line (or list) naming what to fix — never a traceback.
A few cases run as real subprocesses too, so the scripts' own entry points are covered."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import compare
import prepare_buckets
import tag_images
import train_dreambooth
import train_embedding_finetune
import train_hypernetwork
import train_lora
import train_textual_inversion
from library.networks.hypernetwork import Hypernetwork, save_hypernetwork
from library.networks.hypernetwork_spec import HypernetworkSpec
from tests.helpers import SAMPLES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import convert_model  # noqa: E402
import extract_lora  # noqa: E402
import merge_lora  # noqa: E402

BASE = """[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{train}"
resolution = 64
[train]
max_steps = 2
batch_size = 2
[save]
output_dir = "{tmp}/out"
name = "bad"
[logging]
log_dir = "{tmp}/logs"
"""


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A folder with the sample dataset, broken datasets and foreign files every case can point at."""
    root = tmp_path_factory.mktemp("bad")
    shutil.copytree(SAMPLES, root / "train")
    (root / "nofolders" / "cat").mkdir(parents=True)
    (root / "loose").mkdir()
    shutil.copy(next((root / "train").rglob("*.png")), root / "loose" / "a.png")
    (root / "emptyconcept" / "5_cat").mkdir(parents=True)
    (root / "notutf8" / "3_cat").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(root / "notutf8" / "3_cat" / "a.png")
    (root / "notutf8" / "3_cat" / "a.txt").write_bytes(b"caf\xe9 pot")
    (root / "broken" / "3_cat").mkdir(parents=True)
    (root / "broken" / "3_cat" / "a.png").write_bytes(b"not an image")
    (root / "mixed" / "abc").mkdir(parents=True)  # one problem of each kind, reported together
    (root / "mixed" / "3_cat").mkdir()
    (root / "mixed" / "2_empty").mkdir()
    Image.new("RGB", (64, 64)).save(root / "mixed" / "3_cat" / "a.png")
    (root / "mixed" / "3_cat" / "a.txt").write_bytes(b"caf\xe9 pot")
    (root / "mixed" / "3_cat" / "b.png").write_bytes(b"not an image")
    (root / "afile").write_text("x")
    (root / "notoml.toml").write_text("[model\npath = ")
    (root / "latin1.toml").write_bytes("# caf\xe9\n".encode("latin-1"))
    (root / "model.bin.txt").write_text("x")
    sd2_lora = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 1024),
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1024, 2)}
    save_file(sd2_lora, str(root / "sd2_lora.safetensors"), metadata={"ss_base_model_version": "sd_v2"})
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)},
              str(root / "lora_like.safetensors"))
    save_file({"emb_params": torch.zeros(1, 1024)}, str(root / "sd2_embedding.safetensors"))
    save_file({"emb_params": torch.zeros(1, 32)}, str(root / "embedding.safetensors"))
    sd2_widths = Hypernetwork(HypernetworkSpec(layer_structure=(1, 0.01, 1)), [1024, 320, 640, 1280], "sd2")
    save_hypernetwork(sd2_widths, root / "sd2_hypernetwork.pt")
    save_file({"token_ids": torch.tensor([5168]), "rows": torch.zeros(1, 1024)}, str(root / "sd2_rows.safetensors"),
              metadata={"ss_base_model_version": "sd_v2", "kiln_format": "token_rows"})
    save_file({"token_ids": torch.tensor([5168]), "rows": torch.zeros(1, 64)}, str(root / "wide_rows.safetensors"))
    (root / "state-incomplete").mkdir()
    (root / "out").mkdir()
    (root / "out" / "bad.safetensors").write_bytes(b"an earlier run's file")
    return root


def config(place: Path, extra: str = "") -> str:
    """A config file in `place`: the base one plus `extra` TOML sections ("{place}" is filled in)."""
    text = BASE.format(train=(place / "train").as_posix(), tmp=place.as_posix())
    path = place / f"case{len(list(place.glob('case*.toml')))}.toml"
    path.write_text(text + extra.replace("{place}", place.as_posix()), encoding="utf-8")
    return str(path)


def exit_code(main, argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


# (id, script main, argv builder from `place`, text the error must contain)
LORA_CASES = [
    ("config missing", lambda p: ["nowhere.toml", "--check"], "config file not found"),
    ("config not toml", lambda p: [str(p / "notoml.toml"), "--check"], "not valid TOML"),
    ("config not utf-8", lambda p: [str(p / "latin1.toml"), "--check"], "not UTF-8"),
    ("unknown key", lambda p: [config(p, "[network]\nrnak = 4\n"), "--check"], "did you mean 'rank'"),
    ("wrong type", lambda p: [config(p), "train.batch_size=two", "--check"], "'train.batch_size'"),
    ("steps and epochs", lambda p: [config(p, "[optimizer]\n"), "--check", "train.epochs=2", "train.max_steps=3"],
     "exactly one of train.max_steps"),
    ("train_dir missing", lambda p: [config(p), "dataset.train_dir=nowhere", "--check"], "dataset.train_dir"),
    ("train_dir is a file", lambda p: [config(p), f"dataset.train_dir={p / 'afile'}", "--check"], "is a file"),
    ("folder without repeats", lambda p: [config(p), f"dataset.train_dir={p / 'nofolders'}", "--check"],
     "has no repeat count"),
    ("loose images", lambda p: [config(p), f"dataset.train_dir={p / 'loose'}", "--check"], "directly in train_dir"),
    ("no images", lambda p: [config(p), f"dataset.train_dir={p / 'emptyconcept'}", "--check"],
     "no training images found"),
    ("caption not utf-8", lambda p: [config(p), f"dataset.train_dir={p / 'notutf8'}", "--check"], "not valid UTF-8"),
    ("unreadable image", lambda p: [config(p), f"dataset.train_dir={p / 'broken'}", "--check"], "cannot be read"),
    ("mixed dataset problems", lambda p: [config(p), f"dataset.train_dir={p / 'mixed'}", "--check"],
     "dataset: 3 problems"),
    ("caption not utf-8, images skipped", lambda p: [config(p), f"dataset.train_dir={p / 'notutf8'}",
                                                     "dataset.skip_bad_images=true", "--check"], "no training image"),
    ("lr is a boolean", lambda p: [config(p, "[optimizer]\nlr = true\n"), "--check"],
     "'optimizer.lr' = true: expected a number, got a boolean"),
    ("lr is a quoted number", lambda p: [config(p), 'optimizer.lr="1e-4"', "--check"], "without quotes: 0.0001"),
    ("model file missing", lambda p: [config(p), "model.path=nowhere.safetensors", "--check"], "model.path"),
    ("model wrong type", lambda p: [config(p), f"model.path={p / 'model.bin.txt'}", "--check"], "unsupported type"),
    ("model is a lora", lambda p: [config(p), f"model.path={p / 'lora_like.safetensors'}", "--check"],
     "not a Stable Diffusion checkpoint"),
    ("model folder not diffusers", lambda p: [config(p), f"model.path={p / 'loose'}", "--check"],
     "not a diffusers model"),
    ("unknown optimizer", lambda p: [config(p), "optimizer.name=AdamW9bit", "--check"], "did you mean 'AdamW8bit'"),
    ("bad optimizer arg", lambda p: [config(p), "optimizer.args={betaz=[0.9, 0.99]}", "--check"], "betaz"),
    ("bad optimizer value", lambda p: [config(p), "optimizer.args={betas=[1.5, 0.99]}", "--check"], "AdamW"),
    ("dadapt different lrs", lambda p: [config(p), "optimizer.name=DAdaptAdam", "optimizer.lr=1.0",
                                        "network.text_encoder_lr=0.5", "--check"], "same lr in every parameter group"),
    ("unknown scheduler", lambda p: [config(p), "optimizer.scheduler=cosin", "--check"], "did you mean 'cosine'"),
    ("warmup too long", lambda p: [config(p), "optimizer.warmup_steps=50", "--check"], "longer than the whole run"),
    ("warmup twice", lambda p: [config(p), "optimizer.warmup_steps=1", "optimizer.warmup_ratio=0.5", "--check"],
     "keep one"),
    ("xformers missing", lambda p: [config(p), "train.attention=xformers", "--check"], "train.attention"),
    ("fp16 on cpu", lambda p: [config(p), "train.mixed_precision=fp16", "train.device=cpu", "--check"], "fp16"),
    ("cuda missing", lambda p: [config(p), "train.device=cuda", "--check"], "no CUDA device"),
    ("numbered cuda missing", lambda p: [config(p), "train.device=cuda:1", "--check"], "'cuda:1' but no CUDA device"),
    ("device typo", lambda p: [config(p), "train.device=gpu", "--check"], "train.device = 'gpu' is not a device"),
    ("output dir is a file", lambda p: [config(p), f"save.output_dir={p / 'afile'}", "--check"], "save.output_dir"),
    ("earlier outputs", lambda p: [config(p)], "already holds output"),
    ("resume missing", lambda p: [config(p), "save.resume=nowhere-state", "--check"], "save.resume"),
    ("resume incomplete", lambda p: [config(p), f"save.resume={p / 'state-incomplete'}", "save.name=resumed"],
     "not a complete training state"),
    ("init weights not lora", lambda p: [config(p), f"network.init_weights={p / 'afile'}", "--check"],
     "not a readable .safetensors LoRA"),
    ("init weights sd2 lora", lambda p: [config(p), f"network.init_weights={p / 'sd2_lora.safetensors'}", "--check"],
     "made for SD 2.x"),
    ("unknown sampler", lambda p: [config(p), "sample.sampler=heun", "--check"], "unknown sampler 'heun'"),
    ("prompt file missing", lambda p: [config(p), "sample.prompt_file=nowhere.txt", "--check"], "sample.prompt_file"),
    ("previews without prompts", lambda p: [config(p), "sample.every_n_steps=1", "--check"], "no prompts"),
    ("override without value", lambda p: [config(p), "train.max_steps", "--check"], "section.key=value"),
    ("nothing to train", lambda p: [config(p), "network.train_unet=false", "network.train_text_encoder=false",
                                    "--check"], "nothing to train"),
    ("random crop cached", lambda p: [config(p), "dataset.random_crop=true", "--check"], "random_crop"),
    ("text cache while training te", lambda p: [config(p), "dataset.cache_text_encoder_outputs=true", "--check"],
     "network.train_text_encoder"),
    ("clip skip too deep", lambda p: [config(p), "model.clip_skip=12", "save.name=deep"], "model.clip_skip"),
    ("cache dir is a file", lambda p: [config(p), "dataset.cache_latents=disk", f"dataset.cache_dir={p / 'afile'}",
                                       "--check"], "dataset.cache_dir"),
    ("bad max token length", lambda p: [config(p), "train.max_token_length=100", "--check"], "max_token_length"),
    # the sd-scripts training options (noise, loss, masks, block-wise LoRA, EMA, precision)
    ("adaptive noise without offset", lambda p: [config(p), "train.adaptive_noise_scale=0.1", "--check"],
     "train.adaptive_noise_scale needs train.noise_offset"),
    ("timestep range", lambda p: [config(p), "train.min_timestep=500", "train.max_timestep=400", "--check"],
     "train.min_timestep = 500 must be below train.max_timestep = 400"),
    ("huber keys with l2", lambda p: [config(p), "train.huber_c=0.3", "--check"], "train.huber_c applies to"),
    ("unknown loss type", lambda p: [config(p), "train.loss_type=l3", "--check"], "train.loss_type"),
    ("full bf16 without bf16", lambda p: [config(p), "train.full_bf16=true", "--check"],
     "train.full_bf16 = true needs train.mixed_precision"),
    ("v-pred-like on a v model", lambda p: [config(p), "train.v_pred_like_loss=0.1", "model.v_parameterization=true",
                                            "--check"], "train.v_pred_like_loss is for ε-prediction"),
    ("v-pred-like on tiny-sd2", lambda p: [config(p), "train.v_pred_like_loss=0.1", "model.path=builtin:tiny-sd2",
                                           "save.name=vpred"], "this model predicts v"),
    ("fused without adafactor", lambda p: [config(p), "optimizer.fused_backward_pass=true", "--check"],
     "optimizer.fused_backward_pass works with optimizer.name = \"Adafactor\""),
    ("color aug with cache", lambda p: [config(p), "dataset.color_aug=true", "--check"], "dataset.color_aug"),
    ("face crop with buckets", lambda p: [config(p), "dataset.face_crop_aug_range=[2.0, 4.0]",
                                          "dataset.cache_latents=off", "dataset.enable_buckets=true", "--check"],
     "dataset.face_crop_aug_range applies without buckets"),
    ("masks missing", lambda p: [config(p), "dataset.masked_loss=true", "--check"], "have no loss mask"),
    ("masks and random crop", lambda p: [config(p), "dataset.alpha_mask=true", "dataset.random_crop=true",
                                         "dataset.cache_latents=off", "--check"], "loss masks need the same crop"),
    ("mask dir without masks", lambda p: [config(p), f"dataset.mask_dir={p / 'train'}", "--check"],
     "dataset.mask_dir holds mask images"),
    ("mask dir missing", lambda p: [config(p), "dataset.masked_loss=true", "dataset.mask_dir=nowhere", "--check"],
     "dataset.mask_dir: folder not found"),
    ("wildcards with text cache", lambda p: [config(p), "dataset.enable_wildcard=true",
                                             "dataset.cache_text_encoder_outputs=true",
                                             "network.train_text_encoder=false", "--check"], "dataset.enable_wildcard"),
    ("bad lr weight preset", lambda p: [config(p), "network.down_lr_weight=sinus", "--check"],
     "network.down_lr_weight: 'sinus' is neither"),
    ("block dims count", lambda p: [config(p), "network.block_dims=[4, 4, 4]", "--check"],
     "network.block_dims has 3 values, but this model's UNet has 25 blocks"),
    ("block alphas alone", lambda p: [config(p), "network.block_alphas=[1.0]", "--check"],
     "network.block_alphas goes with network.block_dims"),
    ("rank dropout on loha", lambda p: [config(p), "network.type=loha", "network.rank_dropout=0.1", "--check"],
     "network.rank_dropout: LoRA's"),
    ("ema decay", lambda p: [config(p), "ema.decay=1.5", "--check"], "ema.decay"),
]
TI = '[embedding]\nname = "kilnbad"\n'
TI_CASES = [
    ("name is a word", lambda p: [config(p, '[embedding]\nname = "cat"\n'), "--check"], "already a token"),
    ("template missing", lambda p: [config(p, TI + 'template = "nowhere.txt"\n'), "--check"], "embedding.template"),
    ("bad schedule", lambda p: [config(p, TI + 'learn_rate = "0.05:1, 0.02:x"\n'), "--check"], "embedding.learn_rate"),
    ("resume missing", lambda p: [config(p, TI + 'resume = "nowhere.pt"\n'), "--check"], "embedding.resume"),
    ("resume sd2 width", lambda p: [config(p, TI + 'resume = "{place}/sd2_embedding.safetensors"\n'), "--check"],
     "1024-wide vectors"),
    ("reg images", lambda p: [config(p, TI), f"dataset.reg_dir={p / 'train'}", "--check"], "no regularisation"),
    ("mixed dataset problems", lambda p: [config(p, TI), f"dataset.train_dir={p / 'mixed'}", "--check"],
     "captions that cannot be read (1)"),
    ("vectors is a boolean", lambda p: [config(p, TI + "vectors = true\n"), "--check"], "'embedding.vectors'"),
]
HN = '[hypernetwork]\nname = "bad"\n'
HYPERNETWORK_CASES = [
    ("layer structure", lambda p: [config(p, HN + "layer_structure = [1, 2, 2]\n"), "--check"],
     "hypernetwork.layer_structure = [1.0, 2.0, 2.0]: it must start and end with 1"),
    ("unknown activation", lambda p: [config(p, HN + 'activation_func = "relu7"\n'), "--check"],
     "hypernetwork.activation_func = 'relu7' is not an activation A1111 knows"),
    ("unknown init", lambda p: [config(p, HN + 'weight_initialization = "normal"\n'), "--check"],
     "hypernetwork.weight_initialization = 'normal'"),
    ("dropout structure", lambda p: [config(p, HN + "use_dropout = true\ndropout_structure = [0, 0.3]\n"), "--check"],
     "hypernetwork.dropout_structure = [0.0, 0.3]: it needs one value per layer_structure entry"),
    ("size of no context", lambda p: [config(p, HN + "enable_sizes = [32, 1280]\n"), "--check"],
     "hypernetwork.enable_sizes = [32, 1280]: 1280 is no context width"),
    ("name", lambda p: [config(p, '[hypernetwork]\nname = "a/b"\n'), "--check"], "hypernetwork.name 'a/b'"),
    ("template missing", lambda p: [config(p, HN + 'template = "nowhere.txt"\n'), "--check"],
     "hypernetwork.template"),
    ("bad schedule", lambda p: [config(p, HN + 'learn_rate = "0.05:1, x"\n'), "--check"], "hypernetwork.learn_rate"),
    ("resume missing", lambda p: [config(p, HN + 'resume = "nowhere.pt"\n'), "--check"], "hypernetwork.resume"),
    ("resume not a file of it", lambda p: [config(p, HN + 'resume = "{place}/afile"\n'), "--check"],
     "cannot be read as a weights-only torch file"),
    ("resume sd2 widths", lambda p: [config(p, HN + 'resume = "{place}/sd2_hypernetwork.pt"\n'), "--check"],
     "made for another model family"),
    ("reg images", lambda p: [config(p, HN), f"dataset.reg_dir={p / 'train'}", "--check"], "no regularisation"),
]
FT = '[embedding_finetune]\ntokens = ["pot"]\n'
EMBEDDING_FINETUNE_CASES = [
    ("no tokens", lambda p: [config(p, "[embedding_finetune]\n"), "--check"], "not both and not neither"),
    ("blank word", lambda p: [config(p, '[embedding_finetune]\ntokens = ["pot", " "]\n'), "--check"], "none empty"),
    ("text cache", lambda p: [config(p, FT), "dataset.cache_text_encoder_outputs=true", "--check"], "cannot be cached"),
    ("word in no caption", lambda p: [config(p, '[embedding_finetune]\ntokens = ["dragon"]\n'), "save.name=ft"],
     "no caption contains any of embedding_finetune.tokens (dragon)"),
]
DREAMBOOTH_CASES = [
    ("fused with accumulation", lambda p: [config(p), "optimizer.name=Adafactor", "optimizer.fused_backward_pass=true",
                                           "train.gradient_accumulation_steps=2", "--check"],
     "set train.gradient_accumulation_steps = 1"),
    ("class dir name", lambda p: [config(p, '[dreambooth]\nclass_dir = "{place}/classes"\n'), "--check"],
     "name the folder NN_name"),
    ("mixed dataset problems", lambda p: [config(p, '[dreambooth]\n'), f"dataset.train_dir={p / 'mixed'}",
                                          "--check"], "images that cannot be read (1)"),
    ("class images without prompt", lambda p: [config(p, '[dreambooth]\nclass_dir = "{place}/1_pot"\n'
                                                         "num_class_images = 2\n"), "--check"], "class_prompt"),
    ("diffusers name with a dot", lambda p: [config(p, '[dreambooth]\nsave_format = "diffusers"\n'),
                                             "save.name=a.b", "--check"], "no '.'"),
]
TOOL_CASES = [
    (prepare_buckets.main, "prepare: no dataset", lambda p: [config(p), "dataset.train_dir=nowhere", "--no-cache"],
     "dataset.train_dir"),
    (prepare_buckets.main, "prepare: mixed dataset problems", lambda p: [config(p), f"dataset.train_dir={p / 'mixed'}",
                                                                         "--no-cache"], "folder names (1)"),
    (compare.main, "compare: axis kind", lambda p: ["--model", "builtin:tiny-sd15", "--prompt", "x",
                                                    "--x", "colour", "1,2"], "unknown axis kind"),
    (compare.main, "compare: no such lora", lambda p: ["--model", "builtin:tiny-sd15", "--prompt", "x",
                                                       "--x", "lora", "nowhere/*.safetensors"], "nothing matches"),
    (compare.main, "compare: size", lambda p: ["--model", "builtin:tiny-sd15", "--prompt", "x", "--width", "65"],
     "multiples of 8"),
    (compare.main, "compare: sd2 lora", lambda p: ["--model", "builtin:tiny-sd15", "--prompt", "x", "--steps", "1",
                                                   "--lora", str(p / "sd2_lora.safetensors"), "--output",
                                                   str(p / "cmp")], "made for SD 2.x"),
    (compare.main, "compare: sd2 embedding", lambda p: ["--model", "builtin:tiny-sd15", "--prompt", "x", "--steps",
                                                        "1", "--embedding", str(p / "sd2_embedding.safetensors"),
                                                        "--output", str(p / "cmp")], "1024-wide vectors"),
    (compare.main, "compare: sd2 hypernetwork", lambda p: ["--model", "builtin:tiny-sd15", "--prompt", "x", "--steps",
                                                           "1", "--hypernetwork", str(p / "sd2_hypernetwork.pt"),
                                                           "--output", str(p / "cmp")], "made for another model family"),
    (compare.main, "compare: hypernetwork missing", lambda p: ["--model", "builtin:tiny-sd15", "--prompt", "x",
                                                              "--hypernetwork", "nowhere.pt:0.5"], "file not found"),
    (merge_lora.main, "merge: sd2 token rows", lambda p: ["builtin:tiny-sd15", str(p / "m.safetensors"), "--lora",
                                                          str(p / "sd2_rows.safetensors")], "made for SD 2.x"),
    (merge_lora.main, "merge: token rows width", lambda p: ["builtin:tiny-sd15", str(p / "m.safetensors"), "--lora",
                                                            str(p / "wide_rows.safetensors")], "64-wide token rows"),
    (tag_images.main, "tag: no folder", lambda p: ["tag", str(p / "nowhere"), "--model", str(p / "nowhere")],
     "nowhere"),
    (merge_lora.main, "merge: lora missing", lambda p: ["builtin:tiny-sd15", str(p / "m.safetensors"), "--lora",
                                                        str(p / "nowhere.safetensors")], "not found"),
    (merge_lora.main, "merge: embedding", lambda p: ["builtin:tiny-sd15", str(p / "m.safetensors"), "--lora",
                                                     str(p / "embedding.safetensors")], "no LoRA, LoHa or LoKr modules"),
    (merge_lora.main, "merge: sd2 lora", lambda p: ["builtin:tiny-sd15", str(p / "m.safetensors"), "--lora",
                                                    str(p / "sd2_lora.safetensors")], "made for SD 2.x"),
    (merge_lora.main, "merge: output exists", lambda p: ["builtin:tiny-sd15", str(p / "afile"), "--lora",
                                                         str(p / "sd2_lora.safetensors")], "already exists"),
    (extract_lora.main, "extract: families", lambda p: ["builtin:tiny-sd15", "builtin:tiny-sd2",
                                                        str(p / "x.safetensors"), "--rank", "2"], "architectures"),
    (extract_lora.main, "extract: suffix", lambda p: ["builtin:tiny-sd15", "builtin:tiny-sd15", str(p / "x.pt"),
                                                      "--rank", "2"], ".safetensors"),
    (convert_model.main, "convert: source missing", lambda p: ["nowhere.safetensors", str(p / "c.safetensors")],
     "not found"),
    (convert_model.main, "convert: destination exists", lambda p: ["builtin:tiny-sd15", str(p / "afile")],
     "already exists"),
]
CASES = ([(train_lora.main, f"lora: {name}", argv, text) for name, argv, text in LORA_CASES]
         + [(train_textual_inversion.main, f"ti: {name}", argv, text) for name, argv, text in TI_CASES]
         + [(train_dreambooth.main, f"dreambooth: {name}", argv, text) for name, argv, text in DREAMBOOTH_CASES]
         + [(train_hypernetwork.main, f"hypernetwork: {name}", argv, text) for name, argv, text in HYPERNETWORK_CASES]
         + [(train_embedding_finetune.main, f"embedding_finetune: {name}", argv, text)
            for name, argv, text in EMBEDDING_FINETUNE_CASES]
         + TOOL_CASES)


def test_the_corpus_is_large_and_covers_every_script():
    assert len(CASES) >= 40
    assert {main.__module__ for main, *_ in CASES} == {"train_lora", "train_textual_inversion", "train_dreambooth",
                                                       "train_hypernetwork", "train_embedding_finetune",
                                                       "prepare_buckets", "compare", "tag_images", "merge_lora",
                                                       "extract_lora", "convert_model"}


@pytest.mark.parametrize("main, name, argv, text", CASES, ids=[case[1] for case in CASES])
def test_bad_input_is_one_error_line_and_exit_code_2(place, capsys, main, name, argv, text):
    code = exit_code(main, argv(place))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "error:" in err, err
    assert text in err, err


@pytest.mark.parametrize("env, args, text", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, ["train.batch_size=3"], "cannot be split evenly across 2 processes"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, ["train.device=cuda:0"], "names one GPU"),
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, [], "accelerate launch --cpu started one process"),
], ids=["batch not split evenly", "one GPU for several processes", "accelerate launch --cpu"])
def test_bad_launch_is_one_error_line(place, capsys, monkeypatch, env, args, text):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = exit_code(train_lora.main, [config(place), *args, "--check"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and text in err, err


def test_the_other_processes_of_a_launch_fail_silently(place, tmp_path):
    """The main process says what is wrong; the others meet the same problem and exit without repeating it."""
    from tests.faults.runner import run_child

    result = run_child(train_lora.main, [config(place), "train.max_steps=0"], {"WORLD_SIZE": "2", "RANK": "1"},
                       tmp_path / "rank1.log")
    assert result.code == 2 and result.output == "", result.output


@pytest.mark.parametrize("script, args", [("train_lora.py", ["nowhere.toml"]),
                                          ("tools/merge_lora.py", ["builtin:tiny-sd15", "out.safetensors",
                                                                   "--lora", "nowhere.safetensors"])])
def test_scripts_entry_points_report_without_traceback(tmp_path, script, args):
    done = subprocess.run([sys.executable, str(REPO / script), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "error:" in done.stderr, done.stderr


def test_a_bug_shows_its_traceback_and_asks_to_be_reported(capsys):
    from library.cli import BUG_LINE, run_main

    def broken(argv):
        raise KeyError("a bug")

    assert run_main(broken, []) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and BUG_LINE in err
