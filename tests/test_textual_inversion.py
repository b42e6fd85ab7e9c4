"""sdjax.textual_inversion: the embedding files in circulation (A1111 .pt / .safetensors, diffusers learned_embeds)
load as diffusers' `load_textual_inversion` loads them, on a tiny diffusers pipeline saved to disk: the same token
ids and prompt embeddings, nothing else of the vocabulary or the embedding table changed, in both tokenizer
backends, through save_pretrained and sample.py's --config.embeddings."""
from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

import sdjax
from configs import sample as sample_config
from sdjax import jobs, textual_inversion
from sdjax.pipeline import StableDiffusion
from sdjax.tokenizer import VOCAB_SIZE, default_tokenizer, load_tokenizer
from sdjax.weights.safetensors_io import write_safetensors
from sdjax.weights.torch_names import to_state_dict
from tests import tiny_models
from tests.test_tokenizer import PROMPTS, random_prompts

import diffusers
import safetensors.torch
import torch

pytestmark = pytest.mark.xdist_group("textual_inversion")  # one worker builds the tiny pipeline once

WIDTH = tiny_models.CLIP_HIDDEN
# (name, file format, vectors): every format once with one vector and once with three
EMBEDDINGS = [
    ("pt-one", "a1111_pt", 1), ("pt-three", "a1111_pt", 3),
    ("st-one", "a1111_safetensors", 1), ("st-three", "a1111_safetensors", 3),
    ("<df-one>", "diffusers_safetensors", 1), ("<df-three>", "diffusers_safetensors", 3),
    ("<bin-one>", "diffusers_bin", 1), ("<bin-three>", "diffusers_bin", 3),
]


def vectors(n: int, width: int = WIDTH, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + n).standard_normal((n, width)).astype(np.float32) * 0.02


def write_embedding(folder, name: str, fmt: str, vecs: np.ndarray):
    """`vecs` as the program that makes each format writes it; the path holds the name sdjax should read off it."""
    t = torch.from_numpy(vecs)
    if fmt == "a1111_pt":  # A1111's Embedding.save; its "name" field differs from the stem: sdjax takes the stem
        path = folder / f"{name}.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": t.clone().requires_grad_()},
                    "name": f"trained-as-{name}", "step": 1500, "sd_checkpoint": "0123abcd",
                    "sd_checkpoint_name": "tiny"}, path)
    elif fmt == "a1111_safetensors":
        path = folder / f"{name}.safetensors"
        safetensors.torch.save_file({"emb_params": t}, path)
    else:  # diffusers' textual_inversion.py: {placeholder_token: vectors}; one vector as (D,) like sd-concepts
        (folder / name).mkdir()
        value = t[0] if len(t) == 1 else t
        if fmt == "diffusers_safetensors":
            path = folder / name / "learned_embeds.safetensors"
            safetensors.torch.save_file({name: value.contiguous()}, path)
        else:
            path = folder / name / "learned_embeds.bin"
            torch.save({name: value}, path)
    return path


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_models.tiny_diffusers_folder(tmp_path_factory.mktemp("ti"), layers_per_block=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("embeddings")
    return {name: write_embedding(out, name, fmt, vectors(n, seed=k)) for k, (name, fmt, n) in enumerate(EMBEDDINGS)}


@pytest.fixture(scope="module")
def base(folder):
    return sdjax.load_pretrained(folder)


@pytest.fixture
def pipe(base, folder):
    """A fresh copy of the sdjax pipeline (its own text encoder and tokenizer) for a test to add tokens to."""
    return StableDiffusion(nnx.clone(base.text_encoder), base.unet, base.vae, load_tokenizer(folder / "tokenizer"),
                           dict(base.scheduler_config))


def diffusers_pipe(folder):
    return diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                             requires_safety_checker=False)


def diffusers_ids_and_embeddings(dpipe, prompts):
    ids = dpipe.tokenizer(dpipe.maybe_convert_prompt(prompts, dpipe.tokenizer), padding="max_length",
                          max_length=77, truncation=True, return_tensors="np").input_ids
    with torch.no_grad():
        embeds, _ = dpipe.encode_prompt(prompts, "cpu", 1, False)
    return ids, embeds.numpy()


def prompts_using(names) -> list[str]:
    return ([f"a photo of {n} on a table" for n in names] + [", ".join(names) + ", lowres"] +
            [f"A PHOTO OF {n.upper()}" for n in names if "three" not in n])  # diffusers expands lower case only


def test_every_format_matches_diffusers(folder, files, pipe):
    """Each format, 1 and 3 vectors: sdjax's names, token ids, embedding rows and prompt embeddings equal diffusers'
    (given the same name); the vocabulary, the other prompts' ids and every other parameter are unchanged."""
    dpipe = diffusers_pipe(folder)
    table_before = np.asarray(pipe.text_encoder.embeddings.token_embedding.embedding[...])
    others_before = {k: v for k, v in to_state_dict(pipe.text_encoder).items() if "token_embedding" not in k}
    plain = PROMPTS + random_prompts(40)
    plain_ids_before = pipe.tokenizer.encode(plain)
    vocab_before = pipe.tokenizer.vocab_and_merges()

    for name, path in files.items():
        with torch.no_grad():
            dpipe.load_textual_inversion(str(path), token=name)
        assert pipe.load_textual_inversion(path) == name  # the stem (A1111) or the diffusers file's token
    names = list(files)
    n_added = sum(n for _, _, n in EMBEDDINGS)
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == VOCAB_SIZE + n_added

    added = {t: i for t, i in dpipe.tokenizer.added_tokens_encoder.items() if i >= VOCAB_SIZE}
    assert pipe.tokenizer.added_tokens == added  # same names (tok, tok_1, tok_2), same ids
    table = np.asarray(pipe.text_encoder.embeddings.token_embedding.embedding[...])
    reference = dpipe.text_encoder.get_input_embeddings().weight.detach().numpy()
    assert table.shape == reference.shape == (VOCAB_SIZE + n_added, WIDTH)
    np.testing.assert_array_equal(table[VOCAB_SIZE:], reference[VOCAB_SIZE:])
    for k, (name, _, n) in enumerate(EMBEDDINGS):
        rows = [added[name]] + [added[f"{name}_{i}"] for i in range(1, n)]
        np.testing.assert_array_equal(table[rows], vectors(n, seed=k))

    prompts = prompts_using(names)
    ids, embeds = diffusers_ids_and_embeddings(dpipe, prompts)
    ours = pipe.tokenizer(prompts)
    np.testing.assert_array_equal(ours, ids)
    assert [len(set(row) & set(added.values())) for row in ours[:len(names)]] == [n for _, _, n in EMBEDDINGS]
    err = rel_err(pipe.text_encoder(ours), embeds)
    assert err <= 5e-6, err  # measured: 5.1e-7
    print(f"prompt embeddings vs diffusers: {err:.2e} relative")
    upper, = diffusers_ids_and_embeddings(dpipe, ["A PHOTO OF PT-THREE"])[0]  # diffusers: the first vector only
    assert list(pipe.tokenizer(["A PHOTO OF PT-THREE"])[0, 4:7]) == [added[t] for t in ("pt-three", "pt-three_1",
                                                                                        "pt-three_2")]
    assert list(upper[4:6]) == [added["pt-three"], pipe.tokenizer.eos_token_id]

    np.testing.assert_array_equal(table[:VOCAB_SIZE], table_before)  # bit-exact
    others = {k: v for k, v in to_state_dict(pipe.text_encoder).items() if "token_embedding" not in k}
    assert others.keys() == others_before.keys()
    for key, value in others.items():
        np.testing.assert_array_equal(value, others_before[key], err_msg=key)
    assert pipe.tokenizer.vocab_and_merges() == vocab_before
    assert pipe.tokenizer.encode(plain) == plain_ids_before


def test_both_tokenizer_backends_give_the_same_ids(files, tmp_path):
    """The built-in tokenizer and transformers' match added tokens alike (case, glued to words, beside special
    tokens and SD 2.x's "!" pad token), through save / load too; prompts without them keep their ids bit-exact."""
    names = ["pt-three", "<df-one>", "st-three"]
    odd = ["PT-THREE", "xpt-threey", "pt-three,<df-one>", "<DF-ONE>!!", "a<|endoftext|>pt-three<|startoftext|>b",
           "pt-three_1 alone", "pt-three_2pt-three", "st - three", "st-three\u00a0st-three", "caf\u00e9 <df-one>",
           "st-thre", "pt-three" * 30]
    for family, pad in (("sd1", 49407), ("sd2", 0)):
        tokenizer_folder = tmp_path / f"tok-{family}"  # transformers' own save: tokenizer.json, SD 2.x pads with "!"
        tiny_models.tiny_tokenizer(tmp_path / f"files-{family}", family).save_pretrained(str(tokenizer_folder))
        builtin, hf = default_tokenizer(pad), load_tokenizer(tokenizer_folder)
        plain = PROMPTS + random_prompts(60, seed=1)
        before = builtin.encode(plain)
        assert hf.encode(plain) == before
        for tokenizer in (builtin, hf):
            for name in names:
                tokenizer.add_tokens(textual_inversion.read_embedding(files[name]).tokens)
        assert builtin.added_tokens == hf.added_tokens
        assert builtin.encode(odd) == hf.encode(odd)
        np.testing.assert_array_equal(builtin(odd[:-1]), hf(odd[:-1]))
        assert builtin.encode(plain) == before == hf.encode(plain)
        assert builtin.encode(["pt-three"]) == [[hf.added_tokens[t] for t in ("pt-three", "pt-three_1", "pt-three_2")]]

        saved = tmp_path / f"tok-{family}-with-tokens"
        builtin.save(saved)
        reloaded = load_tokenizer(saved)
        assert reloaded.added_tokens == builtin.added_tokens and reloaded.pad_token_id == pad
        assert reloaded.encode(odd) == builtin.encode(odd)
        assert json.loads((saved / "added_tokens.json").read_text()) == builtin.added_tokens


def test_save_pretrained_loads_back_in_diffusers_and_sdjax(folder, files, pipe, tmp_path):
    """A pipeline with embeddings saves as a diffusers folder whose tokenizer lists the tokens and whose text
    encoder has their rows: diffusers and sdjax both load it and give the prompts the same embeddings."""
    for name in ("pt-three", "<df-one>"):
        pipe.load_textual_inversion(files[name])
    sdjax.save_pretrained(pipe, tmp_path / "saved")
    prompts = ["a photo of pt-three", "<df-one> and pt-three, lowres"]
    ours = pipe.text_encoder(pipe.tokenizer(prompts))

    ids, embeds = diffusers_ids_and_embeddings(diffusers_pipe(tmp_path / "saved"), prompts)
    np.testing.assert_array_equal(pipe.tokenizer(prompts), ids)
    err = rel_err(ours, embeds)
    print(f"saved folder in diffusers: {err:.2e} relative")
    assert err <= 5e-6, err  # measured: 5.3e-7
    again = sdjax.load_pretrained(tmp_path / "saved")
    assert again.tokenizer.added_tokens == pipe.tokenizer.added_tokens
    np.testing.assert_array_equal(again.tokenizer(prompts), pipe.tokenizer(prompts))
    np.testing.assert_array_equal(again.text_encoder(again.tokenizer(prompts)), ours)
    with pytest.raises(ValueError, match="holds textual inversion tokens .* save with save_pretrained"):
        sdjax.save_single_file(pipe, tmp_path / "single.safetensors")


def test_errors_name_the_fix_and_change_nothing(files, pipe, tmp_path):
    first = pipe.load_textual_inversion(files["pt-three"])
    rows, count = pipe.text_encoder.config.vocab_size, len(pipe.tokenizer)
    wide = write_embedding(tmp_path, "wide", "a1111_safetensors", vectors(2, 1024))
    cases = [
        (wide, {}, r"its vectors are 1024 wide \(SD 2.x\), this model's text encoder is 128 wide: load an embedding"),
        (files["pt-three"], {}, "token 'pt-three' is already loaded: give this embedding another name"),
        (files["st-one"], {"token": "PT-Three"}, r"token 'PT-Three' is already loaded \(as 'pt-three'"),
        (files["st-one"], {"token": "pt-three_2"}, "token 'pt-three_2' is already loaded"),
        (files["st-one"], {"token": "photo"}, "'photo' is already in CLIP's vocabulary: choose another name"),
    ]
    for path, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe.load_textual_inversion(path, **kwargs)
        assert (pipe.text_encoder.config.vocab_size, len(pipe.tokenizer)) == (rows, count)
        assert pipe.text_encoder.embeddings.token_embedding.embedding[...].shape == (rows, WIDTH)
    assert first == "pt-three" and pipe.load_textual_inversion(files["st-one"], token="renamed") == "renamed"


def test_other_files(tmp_path):
    """Old pickles (a ParameterDict), bare tensors, bfloat16, a folder; and the files that are not embeddings."""
    vecs = vectors(2)
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.from_numpy(vecs))}),
                "name": "old"}, tmp_path / "old-style.pt")
    torch.save(torch.from_numpy(vecs), tmp_path / "bare.pt")
    safetensors.torch.save_file({"emb_params": torch.from_numpy(vecs).bfloat16()}, tmp_path / "bf16.safetensors")
    for stem in ("old-style", "bare"):
        e = textual_inversion.read_embedding(tmp_path / f"{stem}.pt")
        assert e.name == stem
        np.testing.assert_array_equal(e.vectors, vecs)
    e = textual_inversion.read_embedding(tmp_path / "bf16.safetensors")
    np.testing.assert_array_equal(e.vectors, torch.from_numpy(vecs).bfloat16().float().numpy())
    assert e.vectors.dtype == np.float32 and e.name == "bf16" and e.tokens == ["bf16", "bf16_1"]
    folder = write_embedding(tmp_path, "<in-folder>", "diffusers_safetensors", vecs).parent
    assert textual_inversion.read_embedding(folder).name == "<in-folder>"
    assert textual_inversion.read_embedding(folder, token="mine").name == "mine"

    write_safetensors({"clip_l": vectors(1, 768), "clip_g": vectors(2, 1280)}, tmp_path / "sdxl.safetensors")
    torch.save({"string_to_param": {"*": torch.zeros(1, 8), "#": torch.zeros(1, 8)}}, tmp_path / "two.pt")
    write_safetensors({"a": vectors(1), "b": vectors(1)}, tmp_path / "keys.safetensors")
    torch.save({"<x>": torch.zeros(2, 3, 4)}, tmp_path / "rank3.bin")
    (tmp_path / "page.pt").write_text("<!DOCTYPE html><html>not found</html>")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    for name, message in [("sdxl.safetensors", "clip_l holds 1 vectors, clip_g 2; an SDXL embedding holds the same"),
                          ("two.pt", r"holds \['#', '\*'\]"),
                          ("keys.safetensors", r"expected one tensor .* found \['a', 'b'\]"),
                          ("rank3.bin", r"shape \(2, 3, 4\); expected float vectors of shape \(n, width\)"),
                          ("page.pt", "is an HTML page"), ("image.png", "PNG / WebP images are not read"),
                          ("missing.pt", "does not exist"), ("", "without learned_embeds.safetensors")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            textual_inversion.read_embedding(tmp_path / name)


def test_sample_config_embeddings(folder, files, tmp_path, monkeypatch):
    """--config.embeddings: a missing file is one line before anything loads; a bad one stops before the model
    loads; good ones are in the loaded pipeline under their names."""
    config = sample_config.get_config()
    config.update(checkpoint=str(folder), variant="", prompt="a photo of pt-one", output_dir=str(tmp_path / "out"))
    config.embeddings = f"{files['pt-one']},{tmp_path / 'missing.pt'}"
    monkeypatch.setattr(jobs, "load_model", lambda config: pytest.fail("the model loaded before the check"))
    with pytest.raises(jobs.ConfigError, match=r"^--config.embeddings: .*missing.pt does not exist; give textual"):
        jobs.run(config)
    monkeypatch.undo()

    (tmp_path / "bad.pt").write_text("hello")
    for embeddings, message in ((f"{tmp_path / 'bad.pt'}", "bad.pt is a text file"),
                                (f"{files['pt-one']}, {files['pt-one']}", "two files give the name 'pt-one'")):
        config.embeddings = embeddings
        monkeypatch.setattr(jobs, "_load_model", lambda config: pytest.fail("the model loaded before the check"))
        with pytest.raises(jobs.ConfigError, match=message) as error:
            jobs.load_model(config)
        assert "\n" not in str(error.value)
        monkeypatch.undo()

    config.embeddings = f"{files['pt-one']}, {files['<df-three>'].parent}"
    pipe = jobs.load_model(config)
    assert sorted(pipe.tokenizer.added_tokens) == ["<df-three>", "<df-three>_1", "<df-three>_2", "pt-one"]
    assert pipe.text_encoder.config.vocab_size == VOCAB_SIZE + 4
    write_safetensors({"clip_l": vectors(1, 768), "clip_g": vectors(1, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match="xl.safetensors is an SDXL embedding .clip_l . clip_g. and this model is SD"):
        pipe.load_textual_inversion(tmp_path / "xl.safetensors")
    assert pipe.text_encoder.config.vocab_size == VOCAB_SIZE + 4
