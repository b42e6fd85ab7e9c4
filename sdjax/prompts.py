"""A1111's prompt emphasis and long prompts: "(word)", "[word]", "(word:1.5)", BREAK, any number of tokens.

    parse_prompt_attention("a (red:1.3) fox [in] snow")
    # [("a ", 1.0), ("red", 1.3), (" fox ", 1.0), ("in", 0.9090909090909091), (" snow", 1.0)]
    ids, weights = tokenize_prompts(pipe.tokenizer, ["a (red:1.3) fox", "blurry"])   # int32 / float32 (2, k, 77)
    context = encode_prompts(pipe.text_encoder, ids, weights)                       # (2, 77 k, D)

The syntax is A1111's (modules/prompt_parser.py): "(text)" multiplies the weight of its tokens by 1.1, "[text]"
divides it by 1.1, "(text:1.5)" sets the factor to 1.5; they nest and multiply ("((text))" is 1.21). "\\(", "\\)",
"\\[", "\\]" and "\\\\" are the characters themselves. A bracket never closed applies from where it opens to the
end; a closing bracket with none open is text. The word BREAK (upper case) ends the current chunk. So literal
brackets change meaning: write "\\(" to keep one, or use emphasis="None".

A prompt is cut into chunks of 75 tokens as A1111 cuts it: when a chunk is full and the last comma is at most 20
tokens back, the chunk ends after that comma and the tokens since move to the next one; a textual inversion
embedding of several vectors is not split over two chunks. Each chunk is BOS + 75 + EOS laid out as the
checkpoint's tokenizer pads (`pipe.tokenizer`: SD 1.x pads with EOS, SD 2.x with "!" = 0) and goes through the
text encoder alone; the chunks' outputs are concatenated along the sequence, (B, 77 k, D), which the UNet's
cross-attention reads at any length. In a batch every prompt and negative prompt has the batch's chunk count:
shorter ones get empty chunks (the encoding of "") after theirs. A1111 pads a prompt and its negative prompt so
with its "Pad prompt/negative prompt" option on; by default it runs them through the UNet apart when their
lengths differ, which sdjax does not (one batched program).

Emphasis (A1111's "Original"), per chunk, on the text encoder's output z (77, D) (the layer `clip_skip` picks,
final-layer-normed) with the tokens' weights w (77,) (BOS, EOS and padding weigh 1):

    z_w = z * w[:, None]                  # each token's vector times its weight
    z'  = z_w * (mean(z) / mean(z_w))     # means over all 77 x D values: the chunk's mean is kept

The rescale needs a chunk mean away from 0, as trained CLIPs give (their final LayerNorm has a bias); on a freshly
initialised text encoder mean(z) is ~0 and the ratio is noise: use "No norm" there.
A1111 takes the two means over the whole batch of chunks; here they are per prompt, so an image does not depend on
the other prompts of its batch through them (with one prompt per call, as A1111's UI runs, the two agree).
A chunk whose weights are all 1 is the encoder's output unchanged, bit for bit: a prompt without emphasis of up
to 75 tokens gives the same context as `text_encoder(tokenizer(prompt))`. The other A1111 modes: "No norm"
(z_w without the rescale), "Ignore" (the brackets are parsed away, every weight is 1) and "None" (no parsing: the
prompt is text as it is, BREAK too).

Training captions go through `CaptionTokenizer` (train.py; `data.caption_chunks`, `data.weighted_captions`).
"""
from __future__ import annotations

import logging
import math
import re
from typing import Sequence

import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

EMPHASIS = ("Original", "No norm", "Ignore", "None")  # A1111's "Emphasis mode" names
CHUNK_LENGTH = 75  # text tokens per chunk; with BOS and EOS a chunk is 77 ids, the text encoder's length
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"
BREAK = ("BREAK", -1.0)  # the piece parse_prompt_attention gives for a BREAK (A1111 marks it so)

_ROUND, _SQUARE = 1.1, 1 / 1.1
_SYNTAX = re.compile(r"""
      \\[()\[\]\\]              # an escaped bracket or backslash: that character
    | \\                        # any other backslash: dropped
    | [(\[]                     # opens a range
    | :\s*([+-]?[.\d]+)\s*\)    # closes a "(" with an explicit weight
    | [)\]]                     # closes a range
    | [^\\()\[\]:]+ | :         # text
    """, re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A prompt as (text, weight) pieces, A1111's emphasis syntax resolved (see the module docstring); neighbours of
    equal weight are merged, and a BREAK is the piece `BREAK`. A BREAK inside brackets still breaks (in A1111 it
    becomes the word "break" with weight -1.1, surely not what was meant).

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[list] = []  # [text, weight, is_break]
    open_round: list[int] = []  # where each open "(" / "[" starts, as an index into pieces
    open_square: list[int] = []

    def scale(start: int, factor: float):
        for piece in pieces[start:]:
            if not piece[2]:
                piece[1] *= factor

    for match in _SYNTAX.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0, False])
        elif token in "([":
            (open_round if token == "(" else open_square).append(len(pieces))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"prompt weight {weight!r} is not a number, in {text!r:.80}: write (text:1.2), or "
                                 "\\( \\) for literal brackets") from None
            scale(open_round.pop(), factor)
        elif token == ")" and open_round:
            scale(open_round.pop(), _ROUND)
        elif token == "]" and open_square:
            scale(open_square.pop(), _SQUARE)
        else:  # text, or a bracket that closes nothing
            for k, part in enumerate(_BREAK.split(token)):
                if k:
                    pieces.append([BREAK[0], BREAK[1], True])
                pieces.append([part, 1.0, False])
    for start in open_round:  # never closed: from where they open to the end
        scale(start, _ROUND)
    for start in open_square:
        scale(start, _SQUARE)

    merged: list[list] = []
    for piece in pieces or [["", 1.0, False]]:
        if merged and not piece[2] and not merged[-1][2] and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(text, weight) for text, weight, _ in merged]


def _pieces(prompt: str, emphasis: str) -> list[tuple[str, float]]:
    if emphasis not in EMPHASIS:
        raise ValueError(f"emphasis={emphasis!r}: use one of {', '.join(map(repr, EMPHASIS))} (A1111's modes)")
    if emphasis == "None":
        return [(prompt, 1.0)]
    pieces = parse_prompt_attention(prompt)
    if emphasis == "Ignore":
        pieces = [p if p == BREAK else (p[0], 1.0) for p in pieces]
    return pieces


def chunk_tokens(tokenizer, prompt: str, *, emphasis: str = "Original",
                 comma_backtrack: int = COMMA_BACKTRACK) -> list[tuple[list[int], list[float]]]:
    """The prompt's chunks as (text ids, weights), each at most 75 long, without BOS / EOS / padding."""
    pieces = _pieces(prompt, emphasis)
    texts = [text for text, weight in pieces if (text, weight) != BREAK]
    encoded = iter(tokenizer.encode(texts) if texts else [])
    comma = tokenizer.vocab_and_merges()[0].get(",</w>")
    vectors = tokenizer.multi_vector_ids()  # textual inversion: {first id: all ids of the embedding}
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in `ids` of the chunk's last comma

    def close_chunk():
        nonlocal ids, weights, last_comma
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for piece in pieces:
        if piece == BREAK:
            close_chunk()
            continue
        weight = piece[1]
        tokens = next(encoded)
        i = 0
        while i < len(tokens):
            unit = vectors.get(tokens[i])
            n = len(unit) if unit is not None and tokens[i:i + len(unit)] == unit else 1
            if n > CHUNK_LENGTH:
                raise ValueError(f"a textual inversion embedding of {n} vectors does not fit in a chunk of "
                                 f"{CHUNK_LENGTH} tokens")
            if tokens[i] == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK_LENGTH and last_comma >= 0 and len(ids) - last_comma <= comma_backtrack:
                # a full chunk with a comma near its end: end it after the comma, carry the rest over
                ids, carried_ids = ids[:last_comma + 1], ids[last_comma + 1:]
                weights, carried_weights = weights[:last_comma + 1], weights[last_comma + 1:]
                close_chunk()
                ids, weights = carried_ids, carried_weights
            if len(ids) + n > CHUNK_LENGTH:
                close_chunk()
            ids += tokens[i:i + n]
            weights += [weight] * n
            i += n
    if ids or not chunks:
        close_chunk()
    return chunks


def prompt_chunks(tokenizer, prompt: str, *, emphasis: str = "Original") -> tuple[np.ndarray, np.ndarray]:
    """One prompt as (ids int32 (k, 77), weights float32 (k, 77)): k chunks, each BOS + 75 + EOS, padded."""
    chunks = chunk_tokens(tokenizer, prompt, emphasis=emphasis)
    ids = np.stack([tokenizer.row(c) for c, _ in chunks])
    weights = np.ones(ids.shape, np.float32)
    for row, (_, w) in zip(weights, chunks):
        row[1:len(w) + 1] = w
    return ids, weights


def _padded(tokenizer, ids: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, weights) of one prompt with empty chunks (the encoding of "") added up to k chunks."""
    extra = k - len(ids)
    return (np.concatenate([ids, np.repeat(tokenizer.row([])[None], extra, axis=0)]),
            np.concatenate([weights, np.ones((extra, ids.shape[1]), np.float32)]))


def tokenize_prompts(tokenizer, prompts: Sequence[str], *, emphasis: str = "Original",
                     min_chunks: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as (ids int32 (B, k, 77), weights float32 (B, k, 77)); k is the most chunks a prompt needs (at least
    `min_chunks`), and prompts that need fewer end with empty chunks."""
    cache = {}
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = prompt_chunks(tokenizer, prompt, emphasis=emphasis)
    k = max([min_chunks, *(len(ids) for ids, _ in cache.values())])
    rows = [_padded(tokenizer, *cache[p], k) for p in prompts]
    return np.stack([ids for ids, _ in rows]), np.stack([w for _, w in rows])


def count_chunks(tokenizer, prompts: Sequence[str], *, emphasis: str = "Original") -> int:
    """The most chunks any of `prompts` needs (sample.py pads every batch of a job to it: one program per job)."""
    return max(len(chunk_tokens(tokenizer, p, emphasis=emphasis)) for p in set(prompts))


def apply_emphasis(z, weights, *, normalize: bool = True):
    """A1111's emphasis on encoder outputs z (N, 77, D) with weights (N, 77); see the module docstring. Rows whose
    weights are all 1 come back unchanged (not rescaled by a ratio that float rounding may put off 1)."""
    z32 = z.astype(jnp.float32)
    weighted = z32 * weights[..., None]
    if normalize:
        weighted = weighted * (jnp.mean(z32, axis=(1, 2), keepdims=True) /
                               jnp.mean(weighted, axis=(1, 2), keepdims=True))
    plain = jnp.all(weights == 1, axis=-1)[:, None, None]
    return jnp.where(plain, z, weighted.astype(z.dtype))


def encode_prompts(text_encoder, ids, weights=None, *, clip_skip: int = 0, normalize: bool = True):
    """The UNet's context (B, 77 k, D) for ids (B, k, 77) (or (B, 77): k = 1) and their weights (None: all 1):
    each chunk encoded alone, emphasis applied per chunk (`apply_emphasis`), the chunks concatenated."""
    length = ids.shape[-1]
    z = text_encoder(ids.reshape(-1, length), clip_skip=clip_skip)  # (B k, 77, D)
    if weights is not None:
        z = apply_emphasis(z, weights.reshape(-1, length), normalize=normalize)
    return z.reshape(ids.shape[0], -1, z.shape[-1])


class CaptionTokenizer:
    """Training captions -> the train step's text inputs: {"input_ids"} and, for weighted captions,
    {"token_weights"}, each (B, 77) for one chunk or (B, chunks, 77).

    chunks=1, weighted=False is `tokenizer(captions)`: a caption is cut at 75 tokens. With chunks=k a caption keeps
    up to k chunks (cut as prompts are, `prompt_chunks`) and one that needs fewer ends with empty chunks, as a
    prompt does at sampling time in a batch of longer ones. weighted=True parses A1111's emphasis in the captions
    (else brackets are text). Cut captions are counted: the first is logged, then the count at 10, 100, 1000, ...
    """

    def __init__(self, tokenizer, *, chunks: int = 1, weighted: bool = False):
        if not (isinstance(chunks, int) and chunks >= 1):
            raise ValueError(f"data.caption_chunks={chunks!r}: use 1 (77 tokens, as SD was trained) or more "
                             f"(each chunk {CHUNK_LENGTH} tokens more)")
        self.tokenizer, self.chunks, self.weighted = tokenizer, chunks, bool(weighted)
        self.truncated = 0  # captions cut so far
        self.seen = 0

    def __call__(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        captions = [c.decode("utf-8") if isinstance(c, bytes) else c for c in captions]
        self.seen += len(captions)
        if self.chunks == 1 and not self.weighted:
            rows = []
            for caption, ids in zip(captions, self.tokenizer.encode(captions)):
                if len(ids) > CHUNK_LENGTH:
                    self._cut(caption, f"{len(ids) - CHUNK_LENGTH} of its {len(ids)} tokens")
                rows.append(self.tokenizer.row(ids[:CHUNK_LENGTH]))
            return {"input_ids": np.stack(rows)}
        emphasis = "Original" if self.weighted else "None"
        ids, weights = [], []
        for caption in captions:
            i, w = prompt_chunks(self.tokenizer, caption, emphasis=emphasis)
            if len(i) > self.chunks:
                self._cut(caption, f"{len(i) - self.chunks} of its {len(i)} chunks")
                i, w = i[:self.chunks], w[:self.chunks]
            i, w = _padded(self.tokenizer, i, w, self.chunks)
            ids.append(i)
            weights.append(w)
        squeeze = (lambda a: a[:, 0]) if self.chunks == 1 else (lambda a: a)
        out = {"input_ids": squeeze(np.stack(ids))}
        if self.weighted:
            out["token_weights"] = squeeze(np.stack(weights))
        return out

    def _cut(self, caption: str, what: str) -> None:
        self.truncated += 1
        n = self.truncated
        if n == 1:
            log.warning("caption cut to %d chunk(s) of %d tokens (%s dropped): %r; set data.caption_chunks higher to "
                        "keep more. Further cut captions are counted", self.chunks, CHUNK_LENGTH, what, caption[:80])
        elif math.log10(n).is_integer():
            log.warning("%d of %d captions so far were cut to data.caption_chunks=%d chunk(s)", n, self.seen,
                        self.chunks)
