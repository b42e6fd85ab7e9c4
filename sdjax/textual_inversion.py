"""Textual inversion: embeddings from A1111 and diffusers files, added to a pipeline and used by name in prompts.

    name = sdjax.load_textual_inversion(pipe, "EasyNegative.safetensors")   # -> "EasyNegative"
    pipe.load_textual_inversion("learned_embeds.safetensors")               # -> its token, e.g. "<cat-toy>"
    images = pipe.text2img("a <cat-toy> backpack", negative_prompts="easynegative, lowres")

The files in circulation, and the name a prompt uses for each unless `token=` gives one:

    A1111 .pt            torch.save({"string_to_param": {"*": (n, D)}, "name", "step", ...})   the file's stem
    A1111 .safetensors   {"emb_params": (n, D)}                                                the file's stem
    diffusers            learned_embeds.safetensors / .bin: {token: (D,) or (n, D)}            its token
    a bare tensor .pt    torch.save(tensor)                                                    the file's stem
    a folder             holding learned_embeds.safetensors (or .bin), as diffusers reads one  its token
    SDXL .safetensors    {"clip_l": (n, 768), "clip_g": (n, 1280)}                             the file's stem

The stem is A1111's rule (A1111 names every embedding after its file, so renaming the file renames it);
diffusers takes a .pt's `name` field and an A1111 .safetensors' one key ("emb_params"), so there pass `token=`.
D is the text encoder's width: 768 for SD 1.x, 1024 for SD 2.x; another width is an error naming both. An SDXL
embedding holds the same n tokens for each of SDXL's text encoders: clip_l's vectors go to the first (ViT-L),
clip_g's to the second (ViT-bigG; the refiner has only that one), as diffusers' two load_textual_inversion calls
(text_encoder_2=, tokenizer_2=) put them; an SD embedding for SDXL, or an SDXL one for SD, is an error.

An embedding of n vectors becomes the tokens name, name_1, ..., name_{n-1} (diffusers' naming), with ids after
the vocabulary and n new rows of the text encoder's token embedding table; every other token and row stays as it
was. In a prompt, `name` stands for all n vectors (A1111 and diffusers both expand it). It is matched as
transformers matches added tokens: in the lower-cased text, anywhere ("EasyNegative", "easynegative," and
"myeasynegative" all contain it), where A1111 matches the name's own CLIP tokens, at word boundaries. diffusers
expands a multi-vector name only where the prompt spells it in lower case; sdjax in any case, as A1111 does.

.pt / .bin pickles are read with torch (weights_only, no code runs); torch is needed for them alone.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from sdjax.weights.diffusers_folder import read_torch_file
from sdjax.weights.safetensors_io import read_safetensors

SUFFIXES = (".pt", ".bin", ".safetensors")
DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
_FAMILIES = {768: "SD 1.x, or SDXL's clip_l", 1024: "SD 2.x", 1280: "SDXL's clip_g"}


@dataclasses.dataclass(frozen=True)
class Embedding:
    """One embedding as read from its file: the name prompts use and its float32 (n, D) vectors (an SDXL
    embedding's clip_l vectors; its clip_g vectors in vectors_2)."""

    name: str
    vectors: np.ndarray
    path: Path
    format: str  # "a1111" | "a1111_safetensors" | "diffusers" | "tensor" | "sdxl"
    vectors_2: np.ndarray | None = None

    @property
    def tokens(self) -> list[str]:
        """name, name_1, ..., name_{n-1}: one token per vector (diffusers' names)."""
        return [self.name] + [f"{self.name}_{i}" for i in range(1, len(self.vectors))]


def read_embedding(path: str | os.PathLike, token: str | None = None) -> Embedding:
    """An embedding file (or a diffusers folder holding learned_embeds.*), named `token` or by the file's rule."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in DIFFUSERS_NAMES if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} is a folder without {' or '.join(DIFFUSERS_NAMES)}: give the "
                                    "embedding file itself (.pt, .bin or .safetensors)")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a textual inversion file (.pt, .bin or .safetensors)")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: not a textual inversion file; sdjax reads {', '.join(SUFFIXES)} (A1111's "
                         "embeddings hidden in PNG / WebP images are not read)")
    data = read_safetensors(path) if suffix == ".safetensors" else read_torch_file(path)
    fmt, file_name, vectors = _parse(path, data)
    name = token if token is not None else (file_name if file_name is not None else path.stem)
    if fmt != "sdxl":
        return Embedding(name, _as_vectors(path, vectors), path, fmt)
    clip_l, clip_g = (_as_vectors(path, v) for v in vectors)
    if len(clip_l) != len(clip_g):
        raise ValueError(f"{path}: clip_l holds {len(clip_l)} vectors, clip_g {len(clip_g)}; an SDXL embedding holds "
                         "the same number for both text encoders")
    return Embedding(name, clip_l, path, fmt, vectors_2=clip_g)


def _parse(path: Path, data) -> tuple[str, str | None, object]:
    """(format, the name the file itself gives or None for its stem, the vectors) of what a file holds."""
    if isinstance(data, np.ndarray):
        return "tensor", None, data
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: holds {type(data).__name__ if not isinstance(data, dict) else 'an empty dict'}, "
                         "not a textual inversion embedding")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            terms = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"{path}: its string_to_param holds {terms}; an A1111 embedding holds one term ('*')")
        return "a1111", None, next(iter(params.values()))
    if {"clip_l", "clip_g"} <= set(data):
        if len(data) != 2:
            raise ValueError(f"{path}: an SDXL embedding holds clip_l and clip_g alone; found {sorted(data)[:8]}")
        return "sdxl", None, (data["clip_l"], data["clip_g"])
    arrays = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
    if len(arrays) != 1:
        raise ValueError(f"{path}: expected one tensor (diffusers' {{token: vectors}}, A1111's emb_params) or "
                         f"A1111's string_to_param; found {sorted(data)[:8]}")
    (key, vectors), = arrays.items()
    if key == "emb_params":
        return "a1111_safetensors", None, vectors
    return "diffusers", key, vectors


def _as_vectors(path: Path, vectors) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim == 1:
        vectors = vectors[None]
    floating = np.issubdtype(vectors.dtype, np.floating) or vectors.dtype.name == "bfloat16"
    if vectors.ndim != 2 or not vectors.shape[0] or not floating:
        raise ValueError(f"{path}: the embedding is a {vectors.dtype} array of shape {vectors.shape}; expected "
                         "float vectors of shape (n, width)")
    return vectors.astype(np.float32)


def add_embedding(tokenizer, text_encoder, embedding: Embedding, vectors: np.ndarray | None = None) -> list[int]:
    """Add `embedding`'s tokens to `tokenizer` and its vectors (or `vectors`: an SDXL embedding's other set) as new
    rows of `text_encoder`'s token embedding table (a new, longer parameter array; `config.vocab_size` follows).
    Returns the new ids."""
    vectors = embedding.vectors if vectors is None else vectors
    _check_fits(tokenizer, text_encoder, embedding, vectors)
    rows, n = len(tokenizer), len(vectors)
    ids = tokenizer.add_tokens(embedding.tokens)
    if ids != list(range(rows, rows + n)):
        raise RuntimeError(f"the tokenizer gave {embedding.tokens} the ids {ids}, expected {rows}..{rows + n - 1}")
    _grow_token_embedding(text_encoder, vectors)
    return ids


def add_to_pipeline(pipe, embedding: Embedding) -> None:
    """Add `embedding` to every text encoder of `pipe` (SDXL: clip_l's vectors to the first, clip_g's to the
    second), after checking that each fits, so that a misfit changes nothing."""
    sdxl = pipe.family == "sdxl"
    if sdxl != (embedding.vectors_2 is not None):
        width = embedding.vectors.shape[1]
        raise ValueError(f"{embedding.path} is an SDXL embedding (clip_l + clip_g) and this model is SD 1.x / 2.x"
                         if not sdxl else
                         f"{embedding.path} is an embedding for one text encoder ({width} wide, "
                         f"{_FAMILIES.get(width, 'not SDXL')}); this SDXL model needs an SDXL embedding (clip_l and "
                         "clip_g vectors)")
    pairs = [(pipe.tokenizer, pipe.text_encoder, embedding.vectors)]
    if sdxl:
        pairs = [p for p in pairs if p[1] is not None] + [(pipe.tokenizer_2, pipe.text_encoder_2, embedding.vectors_2)]
    for tokenizer, text_encoder, vectors in pairs:
        _check_fits(tokenizer, text_encoder, embedding, vectors)
    for tokenizer, text_encoder, vectors in pairs:
        add_embedding(tokenizer, text_encoder, embedding, vectors)


def _check_fits(tokenizer, text_encoder, embedding: Embedding, vectors: np.ndarray) -> None:
    rows, width = text_encoder.embeddings.token_embedding.embedding[...].shape
    got = vectors.shape[1]
    if got != width:
        def described(d):
            return f"{d} wide" + (f" ({_FAMILIES[d]})" if d in _FAMILIES else "")
        raise ValueError(f"{embedding.path}: its vectors are {described(got)}, this model's text encoder is "
                         f"{described(width)}: load an embedding made for this model")
    if rows != len(tokenizer):
        raise ValueError(f"the text encoder's token embedding has {rows} rows, the tokenizer {len(tokenizer)} ids: "
                         "textual inversion adds rows after both, so they must agree (load the model with its own "
                         "tokenizer)")
    tokenizer.check_new_tokens(embedding.tokens)


def _grow_token_embedding(text_encoder, vectors: np.ndarray) -> None:
    import jax.numpy as jnp

    embed = text_encoder.embeddings.token_embedding
    table = embed.embedding[...]
    grown = jnp.concatenate([table, jnp.asarray(vectors, table.dtype)])
    embed.embedding.set_value(grown)
    embed.num_embeddings = grown.shape[0]
    text_encoder.config = dataclasses.replace(text_encoder.config, vocab_size=grown.shape[0])


def load_textual_inversion(pipe, path: str | os.PathLike, token: str | None = None) -> str:
    """Read an embedding file and add it to `pipe` (its tokenizer and text encoder); returns the name prompts use.

    token: the name to use instead of the file's own (see the module docstring for each format's)."""
    embedding = read_embedding(path, token)
    add_to_pipeline(pipe, embedding)
    return embedding.name
