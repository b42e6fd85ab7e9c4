"""The CLIP BPE tokenizer, padded and truncated the way Stable Diffusion does it.

`pipe.tokenizer(prompts)` gives an int32 (B, 77) array: BOS, up to 75 text tokens, EOS, then the
checkpoint's pad id (SD 1.x pads with "<|endoftext|>" = 49407, the SD 2.x tokenizer with "!" = 0).
Longer prompts and A1111's emphasis syntax: `sdjax.prompts` (chunks of this layout), which the pipeline uses.

Two backends give the same ids:
  * `default_tokenizer()`: built in, instant_clip_tokenizer (a Rust port of OpenAI's tokenizer) behind
    transformers' text cleanup (NFC; it lowercases itself): single files, and `load_tokenizer` of a folder that
    holds CLIP's own files;
  * transformers' CLIPTokenizer: `load_tokenizer` of any other tokenizer/ folder (added tokens, tokenizer.json).

Tokens added for textual inversion (`add_tokens`, `sdjax.textual_inversion`) take the ids after the vocabulary
and are matched as transformers matches added tokens, in both backends: in the normalised text (NFC, runs of
whitespace as one space, lower case), anywhere, the longest first. `tok`, `tok_1`, ..., `tok_{n-1}` are the n
vectors of one embedding, and `encode` turns `tok` into all n ids:

    tokenizer.add_tokens(["<cat-toy>", "<cat-toy>_1"])   # [49408, 49409]
    tokenizer.encode(["a <Cat-Toy> backpack"])           # [[320, 49408, 49409, 14894]]
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import re
import unicodedata
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

MODEL_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894 merges of OpenAI's bpe_simple_vocab_16e6.txt are used
_BPE_HEADER = b"#version: 0.2\n"
_OWN_MARKERS = re.compile(r"(?<=<)(?=(?:start|end)_of_text>)")
# Unicode White_Space, as the \s of transformers' (Rust) normalizer: Python's \s also matches \x1c-\x1f
_WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


class CLIPTokenizer:
    """prompts -> (B, 77) int32 ids. `encode(texts)` gives each text's ids without BOS/EOS.

    `vocab_and_merges()` returns (token -> id dict, list of "a b" merge lines) for `save`.
    `added_tokens` ({name: id}, ids from len(vocab) on) are the tokens `add_tokens` gave the backend.
    """

    def __init__(self, encode: Callable[[list[str]], list[list[int]]], *, pad_token_id: int,
                 vocab_and_merges: Callable[[], tuple[dict[str, int], list[str]]],
                 add_tokens: Callable[[dict[str, int]], None], added_tokens: dict[str, int] | None = None,
                 model_max_length: int = MODEL_MAX_LENGTH, bos_token_id: int = BOS_ID, eos_token_id: int = EOS_ID):
        self._encode = encode  # the backend: texts -> ids, with `added_tokens` split out of the text
        self._backend_add_tokens = add_tokens  # the backend learns {name: id} (in id order)
        self.vocab_and_merges = vocab_and_merges
        self.added_tokens: dict[str, int] = dict(added_tokens or {})
        self.pad_token_id = pad_token_id
        self.model_max_length = model_max_length
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def __len__(self) -> int:
        """The number of ids: the vocabulary's and the added tokens'."""
        return len(self.vocab_and_merges()[0]) + len(self.added_tokens)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids without BOS/EOS, untruncated; a multi-vector token `tok` becomes tok, tok_1, ..."""
        ids = self._encode(texts)
        vectors = self.multi_vector_ids()
        if not vectors:
            return ids
        return [[j for i in row for j in vectors.get(i, (i,))] for row in ids]

    def multi_vector_ids(self) -> dict[int, list[int]]:
        """{id of tok: ids of tok, tok_1, ..., tok_{n-1}} for every added `tok` with a `tok_1` (diffusers' rule)."""
        out = {}
        for name, i in self.added_tokens.items():
            ids, k = [i], 1
            while f"{name}_{k}" in self.added_tokens:
                ids.append(self.added_tokens[f"{name}_{k}"])
                k += 1
            if k > 1:
                out[i] = ids
        return out

    def add_tokens(self, names: Sequence[str]) -> list[int]:
        """Add tokens (the next ids after the vocabulary and the tokens already added, in order); returns their ids.

        A name CLIP's vocabulary holds, or one already added (compared normalised: "Tok" is "tok"), is an error
        that names it, as is an empty name or one with whitespace at either end (it could never match)."""
        self.check_new_tokens(names)
        new = {name: len(self) + k for k, name in enumerate(names)}
        self._backend_add_tokens(new)
        self.added_tokens.update(new)
        return list(new.values())

    def check_new_tokens(self, names: Sequence[str]) -> None:
        """The errors `add_tokens(names)` would raise, raised without adding anything."""
        vocab = self.vocab_and_merges()[0]
        taken = {_normalize(n): n for n in self.added_tokens}
        for name in names:
            if not isinstance(name, str) or not name or name != name.strip():
                raise ValueError(f"token {name!r}: give a non-empty name without whitespace at either end")
            key = _normalize(name)
            if key in vocab or name in vocab:
                raise ValueError(f"token {name!r} is already in CLIP's vocabulary: choose another name (one that "
                                 f"is not a word or word piece, e.g. <{name}>)")
            if key in taken:
                raise ValueError(f"token {name!r} is already loaded" + ("" if taken[key] == name else
                                 f" (as {taken[key]!r}; names are compared in lower case)") +
                                 ": give this embedding another name (token=...)")
            taken[key] = name

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        prompts = _as_prompt_list(prompts)
        keep = self.model_max_length - 2
        out = np.full((len(prompts), self.model_max_length), self.pad_token_id, np.int32)
        for row, (prompt, ids) in enumerate(zip(prompts, self.encode(prompts))):
            if len(ids) > keep:
                warnings.warn(f"prompt truncated: {len(ids) - keep} of its {len(ids)} tokens were dropped "
                              f"(CLIP reads at most {keep} tokens; sdjax.prompts.tokenize_prompts, which the pipeline "
                              f"uses, keeps them all in 77-token chunks): {prompt[:60]!r}...", stacklevel=2)
                ids = ids[:keep]
            out[row] = self.row(ids)
        return out

    def row(self, ids) -> np.ndarray:
        """BOS, `ids` (at most model_max_length - 2), EOS, then the pad id: one prompt's int32 row as the text
        encoder reads it (sdjax.prompts lays out each 77-token chunk with this too)."""
        out = np.full(self.model_max_length, self.pad_token_id, np.int32)
        out[:len(ids) + 2] = [self.bos_token_id, *ids, self.eos_token_id]
        return out

    def save(self, folder: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json (transformers' layout), and
        the added tokens as transformers 4 did: added_tokens.json and the config's added_tokens_decoder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab, merges = self.vocab_and_merges()
        id_to_token = {i: t for t, i in vocab.items()}
        special = {"bos_token": id_to_token[self.bos_token_id], "eos_token": id_to_token[self.eos_token_id],
                   "unk_token": EOS, "pad_token": id_to_token[self.pad_token_id]}
        config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=self.model_max_length,
                      do_lower_case=True, add_prefix_space=False, errors="replace")
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        if self.added_tokens:  # as transformers 4 wrote them; transformers 4 and 5 read either
            def entry(content, special_token):
                return {"content": content, "lstrip": False, "normalized": not special_token, "rstrip": False,
                        "single_word": False, "special": special_token}
            specials = {i: entry(id_to_token[i], True) for i in (self.pad_token_id, self.bos_token_id,
                                                                 self.eos_token_id)}
            added = {i: entry(name, False) for name, i in self.added_tokens.items()}
            config["added_tokens_decoder"] = {str(i): e for i, e in sorted({**specials, **added}.items())}
            (folder / "added_tokens.json").write_text(json.dumps(self.added_tokens, indent=2, ensure_ascii=False)
                                                      + "\n", encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _as_prompt_list(prompts) -> list[str]:
    """A prompt or an iterable of prompts (str, or UTF-8 bytes as datasets give them) as a list of str."""
    if isinstance(prompts, (str, bytes)):
        prompts = [prompts]
    try:
        prompts = [p.decode("utf-8") if isinstance(p, bytes) else p for p in prompts]
    except TypeError:
        prompts = [prompts]
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"the tokenizer takes a prompt string or a list of them, got {prompts!r:.100}")
    return prompts


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a CLIP tokenizer: vocab.json + merges.txt, or a tokenizers tokenizer.json."""
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or all((folder / n).is_file() for n in ("vocab.json", "merges.txt"))


def _read_vocab_and_merges(folder: Path) -> tuple[dict[str, int], list[str]]:
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = [line for line in (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:] if line]
        return vocab, merges
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    # tokenizers writes merges as ["a", "b"] pairs (>= 0.20) or "a b" strings (older)
    return model["vocab"], [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


def load_tokenizer(folder: str | os.PathLike, backend: str = "auto") -> CLIPTokenizer:
    """The tokenizer of a checkpoint's tokenizer/ folder (vocab.json + merges.txt, or tokenizer.json).

    backend="auto": the built-in tokenizer when the folder is CLIP's own (its vocabulary, merges and special tokens,
    no added tokens: every released SD 1.x / 2.x folder), which gives transformers' ids without importing
    transformers (~1 s of a load); else, and with backend="transformers", transformers' CLIPTokenizer.
    """
    if backend not in ("auto", "transformers"):
        raise ValueError(f"backend must be 'auto' or 'transformers', got {backend!r}")
    folder = Path(folder)
    if not has_tokenizer_files(folder):
        raise FileNotFoundError(f"{folder} has no vocab.json + merges.txt nor tokenizer.json: not a CLIP tokenizer "
                                "folder")
    pad = _builtin_pad_id(folder) if backend == "auto" else None
    if pad is not None:
        return default_tokenizer(pad_token_id=pad)
    import transformers

    hf = transformers.CLIPTokenizer.from_pretrained(str(folder))
    vocab, merges = _read_vocab_and_merges(folder)

    def encode(texts):
        # Untruncated, without BOS/EOS: CLIPTokenizer.__call__ truncates and warns; the long-text warning
        # transformers logs is redundant with ours.
        return hf(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    def add_tokens(tokens: dict[str, int]):
        hf.add_tokens(list(tokens))
        got = {name: hf.convert_tokens_to_ids(name) for name in tokens}
        if got != tokens:
            raise RuntimeError(f"transformers' CLIPTokenizer gave the added tokens ids {got}, expected {tokens}")

    pad = hf.pad_token_id if hf.pad_token_id is not None else EOS_ID
    added = {t: i for t, i in sorted(hf.added_tokens_encoder.items(), key=lambda item: item[1]) if t not in vocab}
    return CLIPTokenizer(encode, pad_token_id=pad, vocab_and_merges=lambda: (vocab, merges), add_tokens=add_tokens,
                         added_tokens=added, bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id)


def _builtin_pad_id(folder: Path) -> int | None:
    """The pad id when `folder` holds CLIP's own tokenizer, which the built-in one reproduces: a vocabulary and
    merges (vocab.json + merges.txt, or tokenizer.json) equal to CLIP's, the standard special tokens (BOS, EOS,
    unknown = EOS, a pad token of the vocabulary), lower case, 77 positions, no added or extra special tokens.
    None when anything differs."""
    if (folder / "added_tokens.json").exists():
        return None
    settings: dict = {}
    added: list = []  # tokenizer.json's added tokens: the special ones, with their vocabulary ids
    try:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                settings.update(json.loads((folder / name).read_text(encoding="utf-8")))
        vocab_and_merges = _read_vocab_and_merges(folder)
        if (folder / "tokenizer.json").is_file():
            added = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens") or []
    except (ValueError, OSError, KeyError, TypeError):
        return None  # transformers reports what is wrong with the files

    def content(value):
        return value.get("content") if isinstance(value, dict) else value

    vocab = vocab_and_merges[0]
    pad = content(settings.get("pad_token", EOS))
    standard = (content(settings.get("bos_token", BOS)) == BOS and content(settings.get("eos_token", EOS)) == EOS
                and content(settings.get("unk_token", EOS)) == EOS and pad in vocab
                and settings.get("do_lower_case", True) is True
                and settings.get("model_max_length", MODEL_MAX_LENGTH) == MODEL_MAX_LENGTH
                and settings.get("tokenizer_class", "CLIPTokenizer") in ("CLIPTokenizer", "CLIPTokenizerFast")
                and not settings.get("additional_special_tokens") and not settings.get("extra_special_tokens")
                and all(vocab.get(content(token)) == int(i)
                        for i, token in settings.get("added_tokens_decoder", {}).items())
                and all(isinstance(t, dict) and vocab.get(t.get("content")) == t.get("id") for t in added))
    if not standard or vocab_and_merges != clip_vocab_and_merges():
        return None
    return vocab[pad]


# The pad token each text encoder family was trained with: OpenAI CLIP ViT-L (SD 1.x, SDXL's first encoder) pads with
# <|endoftext|>, OpenCLIP (SD 2.x, SDXL's ViT-bigG; CLIPTextConfig.family "sd2") with "!" (id 0).
PAD_IDS = {"sd1": EOS_ID, "sd2": 0}


def family_tokenizer(family: str) -> CLIPTokenizer:
    """The built-in tokenizer, padding as a text encoder of `family` (`sdjax.clip.CLIPTextConfig.family`) expects."""
    return default_tokenizer(pad_token_id=PAD_IDS[family])


def default_tokenizer(pad_token_id: int = EOS_ID) -> CLIPTokenizer:
    """The built-in CLIP tokenizer (no files needed): instant_clip_tokenizer with transformers' cleanup.

    As in transformers, the special tokens (BOS, EOS and the pad token) are matched in the raw text first and
    each piece between them is encoded on its own: with SD 2.x's pad token "!" (id 0), every "!" of a prompt
    becomes id 0 instead of being merged by the BPE ("!!!" -> 0 0 0, not 995), exactly as diffusers' pipelines
    tokenize it.
    """
    import instant_clip_tokenizer

    if not 0 <= pad_token_id < VOCAB_SIZE:
        raise ValueError(f"pad_token_id={pad_token_id} is not a CLIP token id (0 <= id < {VOCAB_SIZE}); "
                         f"SD 1.x pads with {EOS_ID} ({EOS}), SD 2.x with 0 (\"!\")")
    tok = instant_clip_tokenizer.Tokenizer()
    special = {BOS: BOS_ID, EOS: EOS_ID}
    if pad_token_id not in special.values():
        special[{i: t for t, i in clip_vocab_and_merges()[0].items()}[pad_token_id]] = pad_token_id
    splitter = _alternation(special)
    added: dict[str, int] = {}  # normalised name -> id: matched in the normalised text (transformers' normalized=True)
    added_splitter = None

    def encode_text(text: str) -> list[int]:
        return [i for chunk in _clean(text) for i in tok.encode(chunk)]

    def encode_one(text: str) -> list[int]:
        ids: list[int] = []
        for k, piece in enumerate(splitter.split(text)):  # odd pieces are the special tokens themselves
            if k % 2:
                ids.append(special[piece])
                continue
            parts = added_splitter.split(_normalize(piece)) if added else [piece]
            if len(parts) == 1:  # no added token: the piece as it is
                ids.extend(encode_text(piece))
                continue
            for j, part in enumerate(parts):  # odd parts are added tokens
                ids.extend([added[part]] if j % 2 else encode_text(part))
        return ids

    def add_tokens(tokens: dict[str, int]):
        nonlocal added_splitter
        added.update({_normalize(name): i for name, i in tokens.items()})
        added_splitter = _alternation(added)

    return CLIPTokenizer(lambda texts: [encode_one(t) for t in texts], pad_token_id=pad_token_id,
                         vocab_and_merges=clip_vocab_and_merges, add_tokens=add_tokens)


def _alternation(tokens) -> re.Pattern:
    """A regex whose split() cuts out these strings, longest first (transformers' leftmost-longest match)."""
    return re.compile("(" + "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) + ")")


def _normalize(text: str) -> str:
    """transformers' CLIP normalizer (NFC, runs of whitespace as one space, lower case char by char), which added
    tokens are matched in."""
    return _WHITESPACE.sub(" ", "".join(map(str.lower, unicodedata.normalize("NFC", text))))


def _clean(text: str) -> list[str]:
    """transformers' CLIP normalizer, NFC then lowercase char by char ("ΣΑΣ" -> "σασ", no final sigma);
    its whitespace collapse is a no-op once the pre-tokenizer drops whitespace.

    Returned as chunks: instant_clip_tokenizer reads "<start_of_text>" / "<end_of_text>" as markers, so the
    text is cut after their "<", where the pre-tokenizer splits anyway.
    """
    return _OWN_MARKERS.split("".join(map(str.lower, unicodedata.normalize("NFC", text))))


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI / GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def vocab_from_merges(merges: list[str]) -> dict[str, int]:
    """CLIP's vocabulary exactly as OpenAI builds it: bytes, bytes + "</w>", the merges, BOS, EOS."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def _bpe_text_sources():
    """Where OpenAI's bpe_simple_vocab_16e6.txt can be read offline, best first."""
    spec = importlib.util.find_spec("instant_clip_tokenizer")
    if spec is not None and spec.submodule_search_locations:
        # The compiled module embeds the file verbatim (Rust include_str!).
        for path in sorted(Path(spec.submodule_search_locations[0]).glob("instant_clip_tokenizer*")):
            if path.suffix in (".so", ".pyd"):
                yield str(path), lambda path=path: path.read_bytes()
    spec = importlib.util.find_spec("open_clip")  # open-clip-torch ships it gzipped; not imported
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            yield str(path), lambda path=path: gzip.decompress(path.read_bytes())


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocab.json and merges.txt contents, read from OpenAI's BPE file shipped inside an installed package."""
    for where, read in _bpe_text_sources():
        data = read()
        start = data.find(_BPE_HEADER)
        if start < 0:
            continue
        lines = data[start + len(_BPE_HEADER):].split(b"\n", N_MERGES)[:N_MERGES]
        try:
            merges = [line.decode("utf-8") for line in lines]
        except UnicodeDecodeError:
            continue
        if len(merges) == N_MERGES and all(len(m.split(" ")) == 2 for m in merges):
            vocab = vocab_from_merges(merges)
            if len(vocab) == VOCAB_SIZE:
                return vocab, merges
        warnings.warn(f"{where} does not hold a readable CLIP BPE vocabulary")
    raise RuntimeError("cannot find CLIP's BPE vocabulary (OpenAI's bpe_simple_vocab_16e6.txt) to write "
                       "vocab.json / merges.txt: install instant-clip-tokenizer or open-clip-torch")
