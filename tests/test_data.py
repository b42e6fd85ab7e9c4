"""sdjax.data: the shapes dataset and its caption grammar, the folder dataset, preprocessing and batching."""
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from sdjax.data import folder, preprocess, shapes
from sdjax.data.folder import FolderDataset
from sdjax.data.preprocess import iterate_batches, make_preprocess
from sdjax.data.shapes import ShapesDataset, all_captions, caption_for, parse_caption


# ---------------------------------------------------------------- shapes dataset

def test_shapes_deterministic_and_seeded():
    a, b = ShapesDataset(seed=7), ShapesDataset(seed=7)
    for i in (0, 1, 999):
        x, y = a[i], b[i]
        assert x["image"].dtype == np.uint8 and x["image"].shape == (64, 64, 3)
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["caption"] == y["caption"]
    other = ShapesDataset(seed=8)
    assert [a[i]["caption"] for i in range(20)] != [other[i]["caption"] for i in range(20)]
    assert ShapesDataset(size=32)[3]["image"].shape == (32, 32, 3)
    with pytest.raises(IndexError):
        a[len(a)]


def test_shapes_images_match_labels():
    ex = ShapesDataset(split="all", seed=1)[5]
    img = ex["image"]
    corner = img[0, 0]
    np.testing.assert_array_equal(corner, shapes.BACKGROUNDS[ex["background"]])
    fg = img[np.abs(img.astype(int) - corner).sum(-1) > 100]
    assert len(fg) > 50  # the shape is there, and its interior is the exact named colour
    assert (fg == np.array(shapes.COLORS[ex["color"]], np.uint8)).all(-1).mean() > 0.6


def test_heldout_split_is_disjoint():
    heldout = (("purple", "triangle"), ("orange", "circle"))
    combos = {}
    for split in shapes.SPLITS:
        ds = ShapesDataset(split=split, heldout=heldout, seed=3)
        combos[split] = {(lab["color"], lab["shape"]) for lab in map(ds.labels, range(2000))}
    assert combos["heldout"] == set(heldout)
    assert not combos["train"] & set(heldout)
    assert combos["train"] == set(shapes.all_combos()) - set(heldout)
    assert combos["all"] == set(shapes.all_combos())
    train_captions = set(ShapesDataset(split="train", heldout=heldout).all_captions())
    heldout_captions = set(ShapesDataset(split="heldout", heldout=heldout).all_captions())
    assert not train_captions & heldout_captions
    assert train_captions | heldout_captions == set(all_captions())
    with pytest.raises(ValueError, match="unknown colour"):
        ShapesDataset(heldout=(("mauve", "circle"),))
    with pytest.raises(ValueError, match="unknown split"):
        ShapesDataset(split="test")


def test_new_colours_are_drawn_only_when_asked_and_weighted_by_repeats():
    """The demo's dataset never draws a NEW_COLORS colour (what the pink LoRA teaches is new to the model); colors=
    draws the listed ones, a colour listed k times k times as often; a new colour is apart from the palette."""
    default = ShapesDataset(split="all", seed=2)
    assert {default.labels(i)["color"] for i in range(3000)} == set(shapes.COLORS)
    assert "pink" in shapes.NEW_COLORS and "pink" not in shapes.COLORS
    assert not any("pink" in c for c in default.all_captions())
    pink = ShapesDataset(split="all", seed=2, colors=("pink",))
    ex = pink[3]
    assert ex["color"] == "pink" and parse_caption(ex["caption"]).color == "pink"
    corner = ex["image"][0, 0]
    fg = ex["image"][np.abs(ex["image"].astype(int) - corner).sum(-1) > 100]
    assert (fg == np.array(shapes.NEW_COLORS["pink"], np.uint8)).all(-1).mean() > 0.6
    half = ShapesDataset(seed=2, colors=("pink",) * len(shapes.COLORS) + tuple(shapes.COLORS))
    colors = [half.labels(i)["color"] for i in range(4000)]
    # 24 pink pairs of 45 (the 3 held-out pairs are not drawn): 53%
    assert abs(colors.count("pink") / 4000 - 24 / 45) < 0.03 and set(colors) == set(shapes.PALETTE)
    assert len(half.all_captions()) == len(set(half.all_captions())) == (9 * 3 - 3) * 5 * 3  # each caption once
    for name, rgb in shapes.NEW_COLORS.items():
        near = min(np.linalg.norm(np.subtract(rgb, c)) for c in shapes.COLORS.values())
        far = min(np.linalg.norm(np.subtract(rgb, c)) for c in shapes.BACKGROUNDS.values())
        assert near >= 100 and far >= 135, (name, near, far)
    assert (ShapesDataset(colors="pink, red").combos == ShapesDataset(colors=("pink,red",)).combos  # command lines
            == ShapesDataset(colors=("pink", "red")).combos)
    with pytest.raises(ValueError, match="unknown colour 'mauve'"):
        ShapesDataset(colors=("mauve",))
    with pytest.raises(ValueError, match=r"draws no \(colour, shape\) pair .*: choose other colours or another split"):
        ShapesDataset(split="heldout", colors=("pink",))


def test_caption_grammar_round_trip():
    captions = all_captions()
    assert len(captions) == len(set(captions)) == len(shapes.COLORS) * 3 * 5 * 3
    for c in captions:
        assert caption_for(*parse_caption(c)) == c
    for split in shapes.SPLITS:
        ds = ShapesDataset(split=split, seed=11)
        for i in range(300):
            lab = ds.labels(i)
            parsed = parse_caption(lab["caption"])
            assert (parsed.color, parsed.shape, parsed.position) == (lab["color"], lab["shape"], lab["position"])
            assert parsed.size in (None, lab["size"])
    assert caption_for("orange", "circle", "left") == "an orange circle on the left"
    assert caption_for("blue", "square", "centre", "large") == "a large blue square in the centre"
    assert parse_caption("A Red circle in the CENTER.") == ("red", "circle", "centre", None)
    for bad in ("a red circle", "a red blue circle at the top", "a red blob on the left"):
        with pytest.raises(ValueError, match="caption"):
            parse_caption(bad)


def test_shapes_batches():
    ds = ShapesDataset(seed=2, length=10)
    b = list(ds.batches(4, start_step=1, num_steps=2))
    assert len(b) == 2 and b[0]["images"].shape == (4, 64, 64, 3) and b[0]["images"].dtype == np.uint8
    assert b[1]["captions"] == [ds[i]["caption"] for i in (8, 9, 0, 1)]  # wraps modulo len


# ---------------------------------------------------------------- folder dataset

def _save(path, img, fmt=None, caption=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n")


def _jpeg_bytes(size=(64, 64)):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    """A folder with the awkward cases; every image gets a .txt caption (= its stem)."""
    rgb = np.full((40, 48, 3), (10, 20, 30), np.uint8)
    _save(tmp_path / "a_rgb.png", Image.fromarray(rgb), caption="a_rgb")
    (tmp_path / "b_photo.jpg").write_bytes(_jpeg_bytes())
    (tmp_path / "b_photo.txt").write_text("b_photo")
    (tmp_path / "c_corrupt.png").write_bytes(b"this is not a png")
    (tmp_path / "c_corrupt.txt").write_text("c_corrupt")
    full = _jpeg_bytes((96, 96))
    (tmp_path / "d_truncated.jpg").write_bytes(full[: len(full) // 2])
    (tmp_path / "d_truncated.txt").write_text("d_truncated")
    _save(tmp_path / "e_gray.png", Image.fromarray(np.full((40, 40), 77, np.uint8)), caption="e_gray")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:20] = (255, 0, 0, 255)  # top half opaque red, bottom half fully transparent
    _save(tmp_path / "f_rgba.png", Image.fromarray(rgba, "RGBA"), caption="f_rgba")
    pal = Image.fromarray(np.full((40, 40, 3), (0, 200, 0), np.uint8)).convert("P", palette=Image.ADAPTIVE)
    _save(tmp_path / "g_palette.png", pal, caption="g_palette")
    _save(tmp_path / "h_16bit.png", Image.fromarray(np.full((40, 40), 32896, np.uint16)), caption="h_16bit")
    _save(tmp_path / "i_tiny.png", Image.fromarray(np.zeros((8, 8, 3), np.uint8)), caption="i_tiny")
    _save(tmp_path / "sub" / "j_nested.png", Image.fromarray(rgb), caption="j_nested")
    (tmp_path / "notes.md").write_text("not an image")
    return tmp_path


def test_folder_txt_layout_converts_and_skips(image_folder, caplog):
    with caplog.at_level(logging.WARNING, logger=folder.__name__):
        ds = FolderDataset(image_folder, min_size=32)
    skipped = dict(ds.skipped)
    assert set(skipped) == {"c_corrupt.png", "i_tiny.png"}
    assert "too small (8x8" in skipped["i_tiny.png"] and "cannot read" in skipped["c_corrupt.png"]
    assert "c_corrupt.png" in caplog.text and "i_tiny.png" in caplog.text
    assert ds.file_names == ["a_rgb.png", "b_photo.jpg", "d_truncated.jpg", "e_gray.png", "f_rgba.png",
                             "g_palette.png", "h_16bit.png", "sub/j_nested.png"]
    items = {ds.file_names[i]: ds[i] for i in range(len(ds))}
    for name, ex in items.items():
        assert ex["image"].dtype == np.uint8 and ex["image"].ndim == 3 and ex["image"].shape[-1] == 3
        assert ex["caption"] == ex["file_name"].split("/")[-1].rsplit(".", 1)[0]  # image and caption stay paired
    # the truncated JPEG passes the header check, fails on decode, is skipped and replaced by the next image
    assert items["d_truncated.jpg"]["file_name"] == "e_gray.png"
    assert "d_truncated.jpg" in dict(ds.skipped) and len(ds.skipped) == 3
    np.testing.assert_array_equal(items["e_gray.png"]["image"], np.full((40, 40, 3), 77))
    rgba = items["f_rgba.png"]["image"]
    np.testing.assert_array_equal(rgba[:20], np.broadcast_to((255, 0, 0), (20, 40, 3)))
    np.testing.assert_array_equal(rgba[20:], np.full((20, 40, 3), 255))  # transparent -> white
    np.testing.assert_array_equal(items["g_palette.png"]["image"][0, 0], (0, 200, 0))
    np.testing.assert_array_equal(items["h_16bit.png"]["image"], np.full((40, 40, 3), 128))


def test_folder_full_check_finds_truncation_up_front(image_folder):
    ds = FolderDataset(image_folder, min_size=32, check="full")
    assert {name for name, _ in ds.skipped} == {"c_corrupt.png", "d_truncated.jpg", "i_tiny.png"}
    assert len(ds) == 7
    assert [ds[i]["file_name"] for i in range(len(ds))] == ds.file_names


def test_folder_missing_caption(image_folder):
    (image_folder / "e_gray.txt").unlink()
    with pytest.raises(ValueError, match=r"e_gray\.png.*missing_caption='empty'"):
        FolderDataset(image_folder)
    ds = FolderDataset(image_folder, missing_caption="empty")
    assert ds.captions[ds.file_names.index("e_gray.png")] == ""


def test_folder_metadata_layout(image_folder):
    for txt in image_folder.rglob("*.txt"):
        txt.unlink()
    names = ["a_rgb.png", "b_photo.jpg", "c_corrupt.png", "d_truncated.jpg", "e_gray.png", "f_rgba.png",
             "g_palette.png", "h_16bit.png", "i_tiny.png", "sub/j_nested.png", "gone.png"]
    lines = [json.dumps({"file_name": n, "text": f"caption of {n}"}) for n in names]
    (image_folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ds = FolderDataset(image_folder, check="full")
    assert {n for n, _ in ds.skipped} == {"c_corrupt.png", "d_truncated.jpg", "i_tiny.png", "gone.png"}
    assert "metadata.jsonl but not found" in dict(ds.skipped)["gone.png"]
    for i in range(len(ds)):
        ex = ds[i]
        assert ex["caption"] == f"caption of {ex['file_name']}"
    (image_folder / "metadata.jsonl").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"a_rgb\.png.*metadata\.jsonl"):
        FolderDataset(image_folder)
    (image_folder / "metadata.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: not valid JSON"):
        FolderDataset(image_folder)


def test_folder_empty_and_missing(tmp_path):
    with pytest.raises(ValueError, match="no images found"):
        FolderDataset(tmp_path)
    (tmp_path / "x.png").write_bytes(b"junk")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="no usable images.*x.png"):
        FolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderDataset(tmp_path / "nope")


# ---------------------------------------------------------------- preprocessing and batching

class _ListDataset:
    """Images of assorted sizes whose pixels encode their index (to check what went where)."""

    def __init__(self, n):
        rng = np.random.default_rng(0)
        self.items = []
        for i in range(n):
            h, w = rng.integers(20, 50, size=2)
            self.items.append({"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "caption": f"item {i}"})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_preprocess_shapes_and_ranges():
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    out = preprocess.resize_shorter_side(image, 16)
    assert out.shape == (16, 27, 3)
    assert preprocess.crop(out, 16).shape == (16, 16, 3)
    prep = make_preprocess(16, center_crop=False, random_flip=True, caption_dropout=0.5, resample="lanczos")
    ex = prep({"image": image, "caption": "hi"}, np.random.default_rng(1))
    assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.float32
    assert ex["image"].min() >= -1 and ex["image"].max() <= 1 and ex["image"].min() < -0.5 < 0.5 < ex["image"].max()
    again = prep({"image": image, "caption": "hi"}, np.random.default_rng(1))
    np.testing.assert_array_equal(ex["image"], again["image"])
    crops = {prep({"image": image, "caption": "hi"}, np.random.default_rng(s))["image"].tobytes() for s in range(20)}
    assert len(crops) > 4  # random crop and flip do vary
    flip = make_preprocess(30, random_flip=True)
    flips = [flip({"image": image, "caption": ""}, np.random.default_rng(s))["image"] for s in range(8)]
    base = preprocess.to_float(preprocess.crop(image, 30))
    assert any(np.array_equal(f, base) for f in flips) and any(np.array_equal(f, base[:, ::-1]) for f in flips)
    dropped = [make_preprocess(16, caption_dropout=0.3)({"image": image, "caption": "c"}, np.random.default_rng(s))["caption"]
               for s in range(1000)]
    assert 0.25 < dropped.count("") / 1000 < 0.35
    np.testing.assert_allclose(preprocess.to_float(np.array([[[0, 255, 128]]], np.uint8)), [[[-1, 1, 128 / 127.5 - 1]]],
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="caption_dropout"):
        make_preprocess(16, caption_dropout=1.5)


def _collect(batches):
    return [(b["step"], b["indices"].tolist(), b["captions"], b["images"]) for b in batches]


def test_iterate_batches_resumes_exactly():
    ds = _ListDataset(10)  # global batch 4 over 10 examples: epochs end inside batches
    prep = make_preprocess(16, center_crop=False, random_flip=True, caption_dropout=0.2)
    full = _collect(iterate_batches(ds, 4, seed=5, num_steps=8, preprocess=prep))
    tail = _collect(iterate_batches(ds, 4, seed=5, start_step=5, num_steps=3, preprocess=prep))
    for (s1, i1, c1, x1), (s2, i2, c2, x2) in zip(full[5:], tail, strict=True):
        assert (s1, i1, c1) == (s2, i2, c2)
        np.testing.assert_array_equal(x1, x2)
    flat = [i for _, idx, _, _ in full for i in idx]
    assert sorted(flat[:10]) == sorted(flat[10:20]) == list(range(10))  # each epoch is a permutation
    assert flat[:10] != flat[10:20]  # reshuffled every epoch
    other = _collect(iterate_batches(ds, 4, seed=6, num_steps=3, preprocess=prep))
    assert [b[1] for b in other] != [b[1] for b in full[:3]]
    ordered = _collect(iterate_batches(ds, 4, seed=5, num_steps=3, shuffle=False, preprocess=prep))
    assert [i for b in ordered for i in b[1]] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    same = _ListDataset(1)  # one 16x80 image seen 32 times: 65 crops x 2 flips, each sample its own draw
    same.items[0]["image"] = np.random.default_rng(0).integers(0, 256, (16, 80, 3), dtype=np.uint8)
    images = np.concatenate([b[3] for b in _collect(iterate_batches(same, 4, seed=5, num_steps=8, preprocess=prep))])
    assert len({x.tobytes() for x in images}) > 20
    threaded = _collect(iterate_batches(ds, 4, seed=5, num_steps=8, preprocess=prep, num_threads=2))
    for a, b in zip(full, threaded, strict=True):
        assert a[:3] == b[:3]
        np.testing.assert_array_equal(a[3], b[3])


def test_iterate_batches_host_sharding():
    ds = _ListDataset(23)
    prep = make_preprocess(16, center_crop=False, random_flip=True)
    single = _collect(iterate_batches(ds, 6, seed=1, start_step=2, num_steps=3, preprocess=prep))
    shards = [_collect(iterate_batches(ds, 3, seed=1, start_step=2, num_steps=3, preprocess=prep,
                                       process_index=p, process_count=2)) for p in range(2)]
    for step, (g, h0, h1) in enumerate(zip(single, *shards, strict=True)):
        assert g[0] == h0[0] == h1[0] == step + 2
        assert not set(h0[1]) & set(h1[1])
        assert h0[1] + h1[1] == g[1] and h0[2] + h1[2] == g[2]
        np.testing.assert_array_equal(np.concatenate([h0[3], h1[3]]), g[3])
        assert h0[3].shape == (3, 16, 16, 3)


def test_iterate_batches_errors_and_shapes_default():
    with pytest.raises(ValueError, match="different shapes.*make_preprocess"):
        next(iterate_batches(_ListDataset(5), 4, seed=0))
    with pytest.raises(ValueError, match="process_index"):
        next(iterate_batches(_ListDataset(5), 2, seed=0, process_index=2, process_count=2))
    batch = next(iterate_batches(ShapesDataset(size=32, length=50), 5, seed=0))  # already at resolution
    assert batch["images"].shape == (5, 32, 32, 3) and batch["images"].dtype == np.float32
    assert -1 <= batch["images"].min() and batch["images"].max() <= 1 and len(batch["captions"]) == 5
