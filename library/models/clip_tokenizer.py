"""The Stable Diffusion CLIP tokenizer, built offline.

SD1 and SD2 both use OpenAI's CLIP byte-level BPE vocabulary. The vocabulary file ships inside the
open-clip-torch package, so the tokenizer can be rebuilt without the Hugging Face hub: the token table is
made exactly as OpenAI's ``SimpleTokenizer`` makes it (256 byte symbols, their ``</w>`` variants, one entry
per merge, then the two special tokens), which gives the same ids as ``openai/clip-vit-large-patch14``.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
MODEL_MAX_LENGTH = 77
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# OpenAI keeps the first 48,894 merges of the file (49408 - 256 bytes - 256 '</w>' bytes - 2 special).
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2


class TokenizerUnavailable(RuntimeError):
    """The CLIP vocabulary file cannot be found or read."""


def bpe_vocab_path() -> Path:
    """Locate ``bpe_simple_vocab_16e6.txt.gz`` inside the installed open-clip-torch package.

    The package is found with ``importlib.util.find_spec`` and never imported: importing open_clip pulls in
    torchvision, which is not installed beside the CPU torch.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerUnavailable(
            "The CLIP vocabulary comes from the open-clip-torch package, which is not installed. "
            "Install it without its dependencies: pip install --no-deps -r requirements-nodeps.txt"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / BPE_FILE_NAME
        if candidate.is_file():
            return candidate
    raise TokenizerUnavailable(
        f"open-clip-torch is installed but {BPE_FILE_NAME} is missing from {list(spec.submodule_search_locations)}; "
        "reinstall it: pip install --no-deps --force-reinstall -r requirements-nodeps.txt"
    )


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the rest are shifted above U+0100 in byte order. The dict's
    insertion order is the order of the first 256 vocabulary entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + shift)
            shift += 1
    return dict(zip(byte_values, (chr(c) for c in code_points)))


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Token→id table and merge list, read once per process (the file is 1.3 MB compressed)."""
    path = bpe_vocab_path()
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerUnavailable(f"Cannot read the CLIP vocabulary {path}: {exc}") from exc
    # Line 0 is the "#version" header; the rest are "left right" merges in priority order.
    merges = tuple(tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES])
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise TokenizerUnavailable(f"{path} is not the CLIP BPE vocabulary (unexpected merge list); reinstall open-clip-torch")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise TokenizerUnavailable(f"{path} produced {len(vocab)} tokens instead of {VOCAB_SIZE}; reinstall open-clip-torch")
    return vocab, merges  # type: ignore[return-value]


def clip_vocabulary() -> dict[str, int]:
    """The CLIP token table (token → id), without transformers: config checks use it."""
    return dict(_vocab_and_merges()[0])


@lru_cache(maxsize=1)
def _counting_tokenizer():
    """The CLIP BPE as a bare `tokenizers` pipeline, built the way transformers' CLIPTokenizer builds its own
    (normaliser, pre-tokeniser, BPE). It only counts tokens, for config checks that must not wait for
    transformers to import; tests/models/test_models.py checks it splits text exactly as CLIPTokenizer does."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = _vocab_and_merges()
    tokenizer = Tokenizer(BPE(vocab=dict(vocab), merges=list(merges), dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS_TOKEN))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                   r"""[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.add_special_tokens([BOS_TOKEN, EOS_TOKEN])  # written in a caption, they stay one token each
    return tokenizer


def count_clip_tokens(texts: list[str]) -> list[int]:
    """How many CLIP tokens each text has (start and end tokens not counted)."""
    return [len(encoding.ids) for encoding in _counting_tokenizer().encode_batch(texts, add_special_tokens=False)]


def clip_tokens(text: str) -> list[tuple[str, int]]:
    """The CLIP tokens (as the vocabulary spells them, e.g. "pot</w>") and ids of a text, without transformers."""
    encoding = _counting_tokenizer().encode(text, add_special_tokens=False)
    return list(zip(encoding.tokens, encoding.ids))


def build_clip_tokenizer(pad_token: str = EOS_TOKEN):
    """A fresh CLIPTokenizer built without network access. SD1 pads with the end token, SD2 and SDXL's second
    encoder (OpenCLIP) with "!" (id 0): the padded positions change the text-encoder output, so the model
    family passes its own (library/models/families/).

    A new object is returned on every call because textual inversion adds tokens to it.
    """
    from transformers import CLIPTokenizer  # here: transformers is slow to import and config checks skip it

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=MODEL_MAX_LENGTH,
    )
