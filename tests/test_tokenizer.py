"""sdjax.tokenizer: the built-in CLIP tokenizer, transformers' CLIPTokenizer and load_tokenizer give the same ids."""
import json
import random
import warnings

import numpy as np
import pytest

from sdjax import tokenizer
from sdjax.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, default_tokenizer, load_tokenizer

import transformers

PAD_IDS = {"sd1": EOS_ID, "sd2": 0}  # SD 1.x pads with <|endoftext|>, SD 2.x with "!"

PROMPTS = [
    # plain, case, punctuation, numbers
    "", " ", "   ", "\t\n", "a", "A", "a photo of a cat", "A PHOTO OF A CAT", "A Photo Of A Cat",
    "a painting of a fox sitting in a field at sunrise, trending on artstation, 4k, highly detailed",
    "masterpiece, best quality, (ultra-detailed:1.2), [blurry], {cinematic lighting}, <lora:foo:0.8>",
    "Hello, World!!!", "what?!?! no... yes;;; ok:: -- __ ++ == ## @@ $$ %% ^^ && ** (( )) [[ ]]",
    "1234567890", "3.14159", "1,000,000 dollars", "v1.5 and v2.1", "24mm f/1.4 ISO-100 1/250s", "2024-01-01T12:00:00Z",
    "don't can't won't I'm you're we've they'll he'd it's", "DON'T CAN'T I'M YOU'RE", "rock 'n' roll", "'quoted'",
    "x!y", "!", "¡hola!", "a!!b!!!c", "!!!!!!!!!!!!!!!!!!!!", "..........", "|", "<>", "<|>", "<w>", "</w>", "a</w>b",
    # accents, scripts, Unicode normalisation and case mapping
    "it’s a “smart quote” test — with en–dash … ellipsis", "café naïve résumé façade coöperate",
    "cafe\u0301 (decomposed accent)", "Ångström", "A\u030angstro\u0308m", "Straße groß", "ẞ capital sharp s",
    "İstanbul ıi", "İİ", "ΣΑΣ σας ΟΔΥΣΣΕΥΣ", "Ελληνικά κείμενα", "ΐ ΰ", "\u0345 ypogegrammeni", "Привет, мир!",
    "ПРИВЕТ", "日本語のテキスト", "中文字符测试", "한국어 텍스트", "\u1100\u1161\u11a8 (conjoining jamo)", "العربية نص",
    "हिन्दी पाठ", "ภาษาไทย", "ø æ œ Ø Æ Œ", "Ǆ DŽ dž ǅ ǈ ǋ", "ǰ", "ſ long s", "\u212a Kelvin sign", "\u2126 ohm sign",
    "\u212b angstrom sign", "ﬁne ﬂower ﬃ ﬄ ﬅ (ligatures)", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３", "！fullwidth bang",
    "x² + y³ = z½", "½ ¼ ¾ fractions", "٣ arabic-indic digit ٤٥", "Ⅻ roman numeral ⅻ", "①②③ circled",
    "∑ ∫ √ ∞ ≠ ≤ ≥ ± × ÷", "© ® ™ § ¶ ° µ", "€100 £50 ¥1000 ₿", "a\u0300\u0301\u0302 stacked marks",
    "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇", "\U0001d400\U0001d401 math bold", "\U00010348 gothic", "\ue000 private use",
    "\ufffd replacement",
    # emoji
    "emoji 🐱🚀 ok", "👍🏽 thumbs", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "🇯🇵🇺🇸", "❤️ love ♥ ☺", "🐱🐱🐱🐱🐱🐱🐱🐱", "🂡 playing card",
    "\U0001F600" * 3,
    # whitespace and control characters
    "non\u00a0breaking\u00a0space", "em\u2003space", "zero\u200bwidth\u200bspace", "ideographic\u3000space",
    "crlf\r\nline", "vertical\x0btab\x0cformfeed", "null\x00char", "del\x7fchar", "bell\x07char", "soft\u00adhyphen",
    "rtl\u200fmark", "bom\ufeffchar", "info\x1csep\x1dgroup\x1erecord\x1funit", "next\x85line",
    "line\u2028sep\u2029para",
    "mongolian\u180evowel", "ogham\u1680space", "narrow\u202fnbsp", "hair\u200aspace", "multiple     spaces    here",
    "  leading and trailing  ", "\n\nnewlines\n\n", "tab\tseparated\tvalues",
    # special tokens (and look-alikes) inside the text
    "a<|endoftext|>b", "<|endoftext|>", "<|startoftext|>", "<|startoftext|>hello<|endoftext|>",
    "x <|endoftext|> y <|endoftext|>", "<|ENDOFTEXT|>", "<|endoftext", "endoftext|>", "<|endoftext|",
    "<|endoftext|><|endoftext|>",
    "a<|startoftext|>b<|endoftext|>c", "wow!!! <|endoftext|>!!", "<|STARTOFTEXT|>",
    # instant_clip_tokenizer's own markers must stay plain text
    "<start_of_text>", "x <end_of_text> y", "<START_OF_TEXT> x", "a<<end_of_text>>b", "<start_of_text",
    # code-ish, long words, repetition
    "https://example.com/path?q=1&r=2#frag", "user@example.com", "#hashtag @mention", "C:\\Windows\\System32",
    "/usr/bin/env python", "snake_case_name camelCaseName PascalCase kebab-case", "HTML <b>bold</b> &amp; entities",
    'JSON {"a": [1, 2]}', "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "abcabcabcabcabcabc", "lololololololol",
    "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
    "antidisestablishmentarianism",
]
WORDS = ("cat dog astronaut horse castle forest ocean neon cyberpunk portrait landscape watercolor oil painting "
         "octane render unreal engine bokeh golden hour volumetric fog studio ghibli by greg rutkowski "
         "hyperrealistic 8k intricate elegant sharp focus illustration concept art matte smooth").split()


def random_prompts(n: int, seed: int = 0) -> list[str]:
    """A1111-style prompts from 1 to 90 words, some with odd separators, weights or a prompt from above inside."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.choice([1, 3, 8, 20, 40, 60, 90]))]
        words = [w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.1 else w for w in words]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), rng.choice(PROMPTS[1:]))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words) + 1), f"({rng.choice(WORDS)}:{rng.uniform(0.5, 1.5):.2f})")
        seps = [" ", ", ", " | ", ". ", "; ", " - ", "  ", "\n"]
        out.append("".join(w + rng.choice(seps) for w in words).rstrip(" ") if rng.random() < 0.8 else "".join(words))
    return out


CORPUS = PROMPTS + random_prompts(60) + [" ".join(WORDS) * 3, "🐱" * 100]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> a tokenizer folder written by the built-in tokenizer's save() (the real CLIP vocab.json/merges.txt)."""
    out = {}
    for family, pad in PAD_IDS.items():
        out[family] = tmp_path_factory.mktemp(f"tokenizer-{family}")
        default_tokenizer(pad).save(out[family])
    return out


def transformers_ids(folder, prompts):
    hf = transformers.CLIPTokenizer.from_pretrained(str(folder))
    return hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]


def test_vocabulary_is_clips(folders):
    vocab = json.loads((folders["sd1"] / "vocab.json").read_text(encoding="utf-8"))
    merges = (folders["sd1"] / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == VOCAB_SIZE and sorted(vocab.values()) == list(range(VOCAB_SIZE))
    assert vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID and vocab["!"] == 0
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + tokenizer.N_MERGES
    assert merges[1] == "i n" and vocab["in"] == 512  # the first merge follows the 2 x 256 byte tokens
    # OpenAI's well-known ids, independent of any tokenizer implementation
    ids = default_tokenizer()("a photo of a cat")[0, :7]
    np.testing.assert_array_equal(ids, [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID])


@pytest.mark.parametrize("family", sorted(PAD_IDS))
def test_three_tokenizers_agree(folders, family):
    builtin, loaded = default_tokenizer(PAD_IDS[family]), load_tokenizer(folders[family], backend="transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(str(folders[family]))
    assert len(hf) == VOCAB_SIZE and hf.pad_token_id == loaded.pad_token_id == PAD_IDS[family]
    lengths = [len(ids) for ids in hf(CORPUS, add_special_tokens=False)["input_ids"]]
    too_long = sum(n > 75 for n in lengths)
    assert 200 <= len(CORPUS) and too_long >= 5

    expected = transformers_ids(folders[family], CORPUS)
    for tok in (builtin, loaded):
        with pytest.warns(UserWarning, match="truncated") as record:
            ids = tok(CORPUS)
        assert len(record) == too_long  # one warning per truncated prompt
        assert ids.shape == (len(CORPUS), 77) and ids.dtype == np.int32
        for prompt, row, ref in zip(CORPUS, ids, expected):
            assert row.tolist() == ref.tolist(), f"{prompt!r}"
    for row, n in zip(expected, lengths):
        n = min(n, 75)
        assert row[0] == BOS_ID and row[n + 1] == EOS_ID and (row[n + 2:] == PAD_IDS[family]).all()


def test_sd2_pad_token_is_split_out_like_transformers():
    """transformers treats the pad token "!" as a special token: "!!!" is 0 0 0, not the BPE merge 995."""
    ids = default_tokenizer(0)("wow!!!")[0, :6].tolist()
    assert ids == [BOS_ID, 2781, 0, 0, 0, EOS_ID]
    assert default_tokenizer()("wow!!!")[0, :4].tolist() == [BOS_ID, 2781, 995, EOS_ID]


@pytest.mark.parametrize("backend", ["builtin", "loaded"])
def test_truncation_warns_never_silently(folders, backend):
    tok = default_tokenizer() if backend == "builtin" else load_tokenizer(folders["sd1"], backend="transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = tok("a " * 75)  # 75 tokens: BOS, 75 x "a", EOS fill all 77 places
    assert exact[0].tolist() == [BOS_ID] + [320] * 75 + [EOS_ID]
    with pytest.warns(UserWarning, match=r"prompt truncated: 1 of its 76 tokens"):
        assert tok("a " * 76)[0].tolist() == exact[0].tolist()
    with pytest.warns(UserWarning, match=r"prompt truncated: 25 of its 100 tokens"):
        long = tok(["a cat", "a " * 100])
    assert long[1].tolist() == exact[0].tolist() and long[0, :4].tolist() == [BOS_ID, 320, 2368, EOS_ID]


@pytest.mark.parametrize("family", sorted(PAD_IDS))
def test_save_load_round_trip(folders, tmp_path, family):
    loaded = load_tokenizer(folders[family])
    loaded.save(tmp_path / "again")
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        assert (tmp_path / "again" / name).read_bytes() == (folders[family] / name).read_bytes()
    again = load_tokenizer(tmp_path / "again")
    assert again.pad_token_id == PAD_IDS[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(again(CORPUS), default_tokenizer(PAD_IDS[family])(CORPUS))


def test_load_tokenizer_takes_the_builtin_for_clips_own_files_only(folders, tmp_path):
    """A folder of CLIP's own files (written by sdjax, or by transformers as tokenizer.json) loads as the built-in
    tokenizer, without transformers; one with an added token, or another vocabulary, through transformers, with
    transformers' ids."""
    builtin = tokenizer.clip_vocab_and_merges
    hf = transformers.CLIPTokenizer.from_pretrained(str(folders["sd2"]))
    hf.save_pretrained(str(tmp_path / "by-transformers"))
    for folder, pad in ((folders["sd1"], EOS_ID), (folders["sd2"], 0), (tmp_path / "by-transformers", 0)):
        auto = load_tokenizer(folder)
        assert auto.vocab_and_merges is builtin and auto.pad_token_id == pad, folder
    prompts = ["a <cat-toy> on a table", "a photo of a cat"]
    hf.add_tokens(["<cat-toy>"])
    hf.save_pretrained(str(tmp_path / "added"))
    (tmp_path / "renamed").mkdir()
    for name in ("merges.txt", "special_tokens_map.json"):
        (tmp_path / "renamed" / name).write_bytes((folders["sd1"] / name).read_bytes())
    vocab = json.loads((folders["sd1"] / "vocab.json").read_text(encoding="utf-8"))
    vocab["kitten</w>"], vocab["cat</w>"] = vocab.pop("cat</w>"), vocab.pop("kitten</w>")
    (tmp_path / "renamed" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    for folder in (tmp_path / "added", tmp_path / "renamed"):
        loaded = load_tokenizer(folder)
        assert loaded.vocab_and_merges is not builtin, folder
        np.testing.assert_array_equal(loaded(prompts), transformers_ids(folder, prompts))
    assert not np.array_equal(load_tokenizer(tmp_path / "renamed")(prompts), default_tokenizer()(prompts))
    with pytest.raises(ValueError, match="backend must be 'auto' or 'transformers'"):
        load_tokenizer(folders["sd1"], backend="rust")


def test_tokenizer_json_folder(folders, tmp_path):
    """A folder with only transformers' tokenizer.json (no vocab.json / merges.txt) loads and saves the same vocab."""
    transformers.CLIPTokenizer.from_pretrained(str(folders["sd2"])).save_pretrained(str(tmp_path / "fast"))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "fast" / name).unlink(missing_ok=True)
    assert tokenizer.has_tokenizer_files(tmp_path / "fast")
    fast = load_tokenizer(tmp_path / "fast")
    assert fast.pad_token_id == 0
    np.testing.assert_array_equal(fast(PROMPTS), default_tokenizer(0)(PROMPTS))
    assert fast.vocab_and_merges() == tokenizer.clip_vocab_and_merges()


def test_missing_files_are_a_clear_error(tmp_path):
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    assert not tokenizer.has_tokenizer_files(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no vocab.json \+ merges.txt nor tokenizer.json"):
        load_tokenizer(tmp_path)


def test_bad_pad_token_id():
    with pytest.raises(ValueError, match="pad_token_id=49408 is not a CLIP token id"):
        default_tokenizer(VOCAB_SIZE)


def test_prompt_forms():
    tok = default_tokenizer()
    one = tok("a cat")
    assert one.shape == (1, 77)
    for same in (["a cat"], ("a cat",), np.array(["a cat"]), [b"a cat"]):  # datasets give bytes or numpy strings
        np.testing.assert_array_equal(tok(same), one)
    assert tok([]).shape == (0, 77) and tok([]).dtype == np.int32
    for bad in (None, 3, ["a cat", None]):
        with pytest.raises(TypeError, match="takes a prompt string or a list of them"):
            tok(bad)
