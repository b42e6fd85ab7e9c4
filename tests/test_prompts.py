"""sdjax.prompts: A1111's emphasis parser, 75-token chunks, the mean-preserving rescale, and their use in the
pipeline (negative prompts padded to the positive's chunk count, one program per chunk count), sample.py and the
training captions. The weighted context is checked against transformers' CLIPTextModel with the same weights."""
import logging

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from sdjax import jobs, pipeline, prompts, tokenizer, variants
from sdjax.prompts import BREAK, apply_emphasis, encode_prompts, parse_prompt_attention, prompt_chunks

pytestmark = pytest.mark.xdist_group("prompts")  # one worker builds the tiny pipeline and its programs once

BOS, EOS = tokenizer.BOS_ID, tokenizer.EOS_ID
CAT, DOG, COMMA = 2368, 1929, 267  # "cat</w>", "dog</w>", ",</w>"

# A1111's modules/prompt_parser.py documents these (its doctests), then cases its code decides the same way.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("", [("", 1.0)]),
    ("((word))", [("word", 1.2100000000000002)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]", [("word", 1 / 1.1 / 1.1)]),
    ("(word: 1.5 )", [("word", 1.5)]),
    ("a:b [c:1.5) d)", [("a:b ", 1.0), ("c:1.5) d)", 1 / 1.1)]),  # ":1.5)" closes no "(": text
    ("unopened) ]", [("unopened) ]", 1.0)]),
    ("a \\\\ b \\c", [("a \\ b c", 1.0)]),
    ("a cat BREAK a dog", [("a cat", 1.0), BREAK, ("a dog", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # A1111 would read "BREAK" as a word here: ours breaks
    ("BREAKfast", [("BREAKfast", 1.0)]),
]


@pytest.mark.parametrize("text,expected", A1111_EXAMPLES, ids=[t or "empty" for t, _ in A1111_EXAMPLES])
def test_parser_matches_a1111(text, expected):
    assert parse_prompt_attention(text) == expected


def test_parser_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"prompt weight '1.2.3' is not a number.*\(text:1.2\)"):
        parse_prompt_attention("(cat:1.2.3)")
    with pytest.raises(ValueError, match="emphasis='Strong': use one of 'Original', 'No norm', 'Ignore', 'None'"):
        prompt_chunks(tokenizer.default_tokenizer(), "cat", emphasis="Strong")


@pytest.fixture(scope="module")
def tok():
    return tokenizer.default_tokenizer()


def test_long_prompt_chunks_and_padding(tok):
    ids, weights = prompt_chunks(tok, "cat " * 80)
    assert ids.shape == weights.shape == (2, 77)
    np.testing.assert_array_equal(ids[0], [BOS] + [CAT] * 75 + [EOS])
    np.testing.assert_array_equal(ids[1], [BOS] + [CAT] * 5 + [EOS] * 71)  # SD 1.x pads with EOS
    sd2 = tokenizer.default_tokenizer(pad_token_id=0)
    ids2, _ = prompt_chunks(sd2, "cat " * 80)
    np.testing.assert_array_equal(ids2[1], [BOS] + [CAT] * 5 + [EOS] + [0] * 70)  # SD 2.x with "!" = 0
    assert (weights == 1).all()
    # exactly 75 tokens fit one chunk; a 76th opens a second
    assert len(prompt_chunks(tok, "cat " * 75)[0]) == 1 and len(prompt_chunks(tok, "cat " * 76)[0]) == 2


def test_break_and_comma_backtrack(tok):
    ids, _ = prompt_chunks(tok, "a cat BREAK a dog")
    np.testing.assert_array_equal(ids[:, :4], [[BOS, 320, CAT, EOS], [BOS, 320, DOG, EOS]])
    assert len(prompt_chunks(tok, "cat BREAK BREAK dog")[0]) == 3  # an empty chunk between two BREAKs, as A1111
    # full at the 76th token, the last comma 5 back: the chunk ends after the comma, the 4 dogs move on
    ids, _ = prompt_chunks(tok, "cat " * 70 + ", " + "dog " * 10)
    np.testing.assert_array_equal(ids[0, :73], [BOS] + [CAT] * 70 + [COMMA, EOS])
    np.testing.assert_array_equal(ids[1, :12], [BOS] + [DOG] * 10 + [EOS])
    # the comma 25 back (more than 20): no backtrack
    ids, _ = prompt_chunks(tok, "cat " * 50 + ", " + "dog " * 30)
    np.testing.assert_array_equal(ids[0], [BOS] + [CAT] * 50 + [COMMA] + [DOG] * 24 + [EOS])
    np.testing.assert_array_equal(ids[1, :8], [BOS] + [DOG] * 6 + [EOS])


def test_weights_follow_their_tokens(tok):
    ids, weights = prompt_chunks(tok, "a (cat:1.5) [dog] BREAK ((cat))")
    np.testing.assert_array_equal(ids[0, :5], [BOS, 320, CAT, DOG, EOS])
    np.testing.assert_allclose(weights[0, :5], [1, 1, 1.5, 1 / 1.1, 1], rtol=1e-7)
    np.testing.assert_allclose(weights[1, :3], [1, 1.21, 1], rtol=1e-7)
    assert (weights[:, 5:] == 1).all()
    ids_none, weights_none = prompt_chunks(tok, "a (cat:1.5)", emphasis="None")  # brackets are text
    np.testing.assert_array_equal(ids_none, tok(["a (cat:1.5)"]))
    assert (weights_none == 1).all()
    ids_ignore, weights_ignore = prompt_chunks(tok, "a (cat:1.5)", emphasis="Ignore")
    np.testing.assert_array_equal(ids_ignore[0, :4], [BOS, 320, CAT, EOS])
    assert (weights_ignore == 1).all()


def test_plain_prompts_give_todays_ids(tok):
    sd2 = tokenizer.default_tokenizer(pad_token_id=0)
    for t in (tok, sd2):
        texts = ["a photo of an astronaut riding a horse, 4k: high detail", "", "cat " * 75]
        ids, weights = prompts.tokenize_prompts(t, texts)
        np.testing.assert_array_equal(ids[:, 0], t(texts))
        assert ids.shape == (3, 1, 77) and (weights == 1).all()


def test_a_textual_inversion_embedding_stays_in_one_chunk():
    t = tokenizer.default_tokenizer()
    first, *_ = t.add_tokens(["<emb>", "<emb>_1", "<emb>_2"])
    ids, weights = prompt_chunks(t, "cat " * 74 + "(<emb>:1.2)")
    np.testing.assert_array_equal(ids[0], [BOS] + [CAT] * 74 + [EOS, EOS])
    np.testing.assert_array_equal(ids[1, :5], [BOS, first, first + 1, first + 2, EOS])
    np.testing.assert_allclose(weights[1, :5], [1, 1.2, 1.2, 1.2, 1])


def test_negative_and_positive_get_the_same_chunk_count(tok):
    ids, weights = prompts.tokenize_prompts(tok, ["cat " * 100, "a dog", "", "blurry " * 160])
    assert ids.shape == weights.shape == (4, 3, 77)
    empty = tok([""])[0]
    for row, chunks in ((0, 2), (1, 1), (2, 1)):  # the empty chunks after a prompt's own are the encoding of ""
        assert (ids[row, chunks:] == empty).all()
    assert (ids[3] != empty).any(axis=-1).all()
    assert prompts.tokenize_prompts(tok, ["a dog"], min_chunks=2)[0].shape == (1, 2, 77)
    assert prompts.count_chunks(tok, ["a dog", "cat " * 100, "cat BREAK dog"]) == 2


def test_rescale_keeps_each_chunks_mean():
    z = jax.random.normal(jax.random.key(0), (3, 77, 16)) + 0.3
    w = np.ones((3, 77), np.float32)
    w[0, 3:6] = 1.5
    w[1, 10] = 0.5
    out = np.asarray(apply_emphasis(z, w))
    np.testing.assert_allclose(out.mean(axis=(1, 2)), np.asarray(z).mean(axis=(1, 2)), rtol=1e-5)
    expected = np.asarray(z) * w[..., None]
    expected *= np.asarray(z).mean(axis=(1, 2), keepdims=True) / expected.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[2], np.asarray(z)[2])  # all weights 1: untouched
    no_norm = np.asarray(apply_emphasis(z, w, normalize=False))
    np.testing.assert_allclose(no_norm, np.asarray(z) * w[..., None], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_pipe():
    variant = variants.get("tiny")
    return pipeline.StableDiffusion(*variant.build(), tokenizer.default_tokenizer(), dict(variant.scheduler))


def test_plain_prompt_context_is_bit_exact(tiny_pipe):
    """A prompt without emphasis, up to 75 tokens: the context the pipeline encoded before, bit for bit."""
    encoder = tiny_pipe.text_encoder
    texts = ["a photo of an astronaut riding a horse", ""]
    ids, weights = prompts.tokenize_prompts(tiny_pipe.tokenizer, texts)
    before = jax.jit(lambda i: encoder(i, clip_skip=1))(tiny_pipe.tokenizer(texts))  # separate programs, as in
    now = jax.jit(lambda i, w: encode_prompts(encoder, i, w, clip_skip=1))(ids, weights)  # the pipeline
    np.testing.assert_array_equal(np.asarray(now), np.asarray(before))


def test_weighted_long_context_matches_transformers(tiny_pipe):
    """The same weights in transformers' CLIPTextModel, chunks encoded, weighted and rescaled by hand."""
    import torch
    import transformers

    from sdjax.weights.torch_names import to_state_dict

    # A trained CLIP's final LayerNorm has a bias, so a chunk's mean is far from 0; a fresh one's is ~0 and
    # mean(z) / mean(z_w) is then noise (the rescale assumes a mean that is not ~0, in A1111 too).
    encoder = nnx.clone(tiny_pipe.text_encoder)
    bias = encoder.final_layer_norm.bias
    bias.set_value(0.3 + 0.2 * jax.random.normal(jax.random.key(1), bias.get_value().shape))
    c = encoder.config
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
        bos_token_id=BOS, eos_token_id=EOS)).eval()
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""  # transformers 4 / 5
    state = {k: torch.from_numpy(v.copy()) for k, v in to_state_dict(encoder, prefix=prefix).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)

    text = "a (red:1.4) fox in the [snow], " * 12 + "BREAK ((sunset))"
    ids, weights = prompt_chunks(tiny_pipe.tokenizer, text)
    assert ids.shape == (3, 77)
    chunks = []
    with torch.no_grad():
        for chunk_ids, w in zip(ids, weights):
            z = model(torch.from_numpy(chunk_ids[None].astype(np.int64))).last_hidden_state[0].double().numpy()
            zw = z * w[:, None]
            chunks.append(zw * (z.mean() / zw.mean()))
    theirs = np.concatenate(chunks)[None]
    ours = np.asarray(jax.jit(lambda i, w: encode_prompts(encoder, i, w))(ids[None], weights[None]), np.float64)
    assert ours.shape == theirs.shape == (1, 3 * 77, c.hidden_size)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


LONG = "a photo of a red fox in the snow, " * 10  # 100 tokens: 2 chunks


def test_text2img_long_prompts_one_program_per_chunk_count(tiny_pipe):
    """One program for the chunk count 2 (a negative prompt is padded to the positive's count and the other way
    round); the tokens after the 75th change the image. (Compiling a program costs 10-20 s here: one only.)"""
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="latent", sampler="Euler")
    programs = pipeline._denoise_jit._cache_size
    before = programs()
    long = tiny_pipe.text2img([LONG], negative_prompts=["blurry"], **kw)  # 2 chunks; the negative padded to 2
    assert programs() == before + 1
    tiny_pipe.text2img(["a (red:1.3) fox"], negative_prompts=["ugly, " * 50], **kw)  # the positive padded to 2
    assert programs() == before + 1
    cut = "a photo of a red fox in the snow, " * 7 + "a photo of a red"  # LONG's first 75 tokens: what was read
    with pytest.warns(UserWarning, match="truncated"):
        np.testing.assert_array_equal(prompts.tokenize_prompts(tiny_pipe.tokenizer, [cut])[0][:, 0],
                                      tiny_pipe.tokenizer([LONG]))
    truncated = tiny_pipe.text2img([cut], negative_prompts=["blurry"], min_chunks=2, **kw)  # + an empty chunk
    assert programs() == before + 1
    assert np.abs(long - truncated).max() > 1e-3 * np.abs(truncated).max()


def test_sample_job_pads_to_the_jobs_chunk_count_and_records_prompts_as_written(tiny_pipe, tmp_path,
                                                                                   monkeypatch):
    from configs import sample as sample_config

    calls = []

    def generate(pipe, texts, **kwargs):
        calls.append(dict(kwargs, prompts=texts))
        return np.zeros((len(texts), 32, 32, 3), np.uint8)

    monkeypatch.setattr(jobs, "_load_model", lambda config: tiny_pipe)
    monkeypatch.setattr(pipeline, "generate", generate)
    (tmp_path / "prompts.txt").write_text("a (red:1.3) fox BREAK " + LONG + "\na cat\n")
    config = sample_config.get_config()
    config.update(variant="tiny", prompts_file=str(tmp_path / "prompts.txt"), negative_prompt="[blurry]", steps=2,
                  height=32, width=32, emphasis="No norm", output_dir=str(tmp_path / "out"), batch_size=1)
    jobs.run(config)
    assert [(c["prompts"], c["min_chunks"], c["emphasis"]) for c in calls] == [
        (["a (red:1.3) fox BREAK " + LONG.strip()], 3, "No norm"), (["a cat"], 3, "No norm")]
    png = next((tmp_path / "out").glob("00000-*.png"))
    prompt, negative, fields = jobs.parse_parameters(Image.open(png).info["parameters"])
    assert (prompt, negative, fields["Emphasis"]) == ("a (red:1.3) fox BREAK " + LONG.strip(), "[blurry]", "No norm")
    config.emphasis = "Loud"
    with pytest.raises(jobs.ConfigError, match="--config.emphasis='Loud': use one of"):
        jobs.run(config)


def test_caption_tokenizer(tok, caplog):
    captions = ["a cat", "cat " * 100, "a (cat:1.5), " * 3]
    with pytest.warns(UserWarning, match="truncated"):
        today = tok(captions)
    plain = prompts.CaptionTokenizer(tok)
    with caplog.at_level(logging.WARNING, logger="sdjax.prompts"):
        out = plain(captions)
        plain(captions)
    assert set(out) == {"input_ids"}
    np.testing.assert_array_equal(out["input_ids"], today)  # chunks=1: today's ids, cut at 75 tokens
    assert plain.truncated == 2 and len(caplog.records) == 1 and "caption_chunks" in caplog.text

    two = prompts.CaptionTokenizer(tok, chunks=2, weighted=True)(captions + ["cat " * 200])
    assert two["input_ids"].shape == two["token_weights"].shape == (4, 2, 77)
    assert (two["input_ids"][0, 1] == tok([""])[0]).all()  # padded with an empty chunk
    np.testing.assert_array_equal(two["input_ids"][1, 1, :27], [BOS] + [CAT] * 25 + [EOS])
    assert two["token_weights"][2, 0, 2] == np.float32(1.5)
    literal = prompts.CaptionTokenizer(tok, chunks=2)(captions)  # not weighted: brackets are text
    assert set(literal) == {"input_ids"} and literal["input_ids"][2, 0, 2] == tok.encode(["("])[0][0]
    with pytest.raises(ValueError, match="data.caption_chunks=0"):
        prompts.CaptionTokenizer(tok, chunks=0)
