"""Tests for sur_lib.data and sur_lib.infra.surd_files: SURD folders, validation messages,
transforms, collate, hub loader."""
from __future__ import annotations

import io
import json
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sur_lib.data import SURDDataset, collate, load_surd_hub
from sur_lib.infra.surd_files import Reason, SURDError, SURDReport, write_metadata

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# ----------------------------------------------------------------- helpers
def save_image(path, w=40, h=30, seed=0, fmt=None):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def png_bytes(w=40, h=30, seed=0, fmt="PNG"):
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def row(file_name="good.png", text="a red cube", prompt="a red cube, studio light, 8k"):
    return json.dumps({"file_name": file_name, "text": text, "prompt": prompt})


def write_lines(root, lines):
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "metadata.jsonl"


def knowledge(dim=8):
    g = torch.Generator().manual_seed(0)
    return {
        "a red cube": torch.randn(dim, generator=g).half(),  # fp16, like the authors' files
        "a blue ball": torch.randn(dim, generator=g).half(),
        "a wide prompt": torch.randn(dim - 1, generator=g),
        "a matrix prompt": torch.randn(2, dim, generator=g),
    }


@pytest.fixture
def folder(tmp_path):
    """A folder with good images and a few broken ones (no metadata yet)."""
    save_image(tmp_path / "good.png", seed=1)
    save_image(tmp_path / "other.png", seed=2)
    save_image(tmp_path / "b.png", seed=3)
    (tmp_path / "corrupt.png").write_bytes(np.random.default_rng(4).bytes(500))
    data = png_bytes(seed=5)
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    return tmp_path


def solid_stripes(path, widths_colors, h):
    """Image made of vertical stripes: [(width, rgb), ...] left to right, height h."""
    cols = [np.tile(np.array(c, np.uint8), (h, w, 1)) for w, c in widths_colors]
    Image.fromarray(np.concatenate(cols, axis=1)).save(path)


# ----------------------------------------------------------------- happy path
def test_happy_path_shapes_range_dtype(folder):
    write_lines(folder, [row(), "", row("other.png", "a blue ball", "a blue ball, octane")])
    ds = SURDDataset(folder, resolution=16, knowledge=knowledge())
    assert len(ds) == 2 and ds.report.n_ok == 2 and ds.report.n_lines == 2
    assert ds.prompts() == ["a red cube", "a blue ball"]
    assert ds.lines == [1, 3]
    assert ds.knowledge_dim == 8
    item = ds[1]
    x = item["pixel_values"]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0.1
    assert item["simple"] == "a blue ball" and item["complex"] == "a blue ball, octane"
    assert item["file_name"] == "other.png"
    assert item["knowledge"].dtype == torch.float32 and item["knowledge"].shape == (8,)

    batch = collate([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["knowledge"].shape == (2, 8)
    assert batch["simple"] == ["a red cube", "a blue ball"]
    assert batch["file_name"] == ["good.png", "other.png"]
    assert "knowledge" not in SURDDataset(folder, resolution=16)[0]


def test_exact_pixels_without_resize(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    write_lines(tmp_path, [row("a.png")])
    x = SURDDataset(tmp_path, resolution=8, random_flip=False)[0]["pixel_values"]
    expected = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(x, expected)
    assert x.min() >= -1 and x.max() <= 1


def test_rgba_and_grayscale_become_rgb(tmp_path):
    Image.new("RGBA", (12, 10), (10, 20, 30, 0)).save(tmp_path / "a.png")
    Image.new("L", (10, 12), 200).save(tmp_path / "g.png")
    write_lines(tmp_path, [row("a.png"), row("g.png")])
    ds = SURDDataset(tmp_path, resolution=8)
    assert ds[0]["pixel_values"].shape == ds[1]["pixel_values"].shape == (3, 8, 8)


@pytest.mark.parametrize("wide", [True, False])
def test_resize_shorter_side_and_centre_crop_keeps_centre(tmp_path, wide):
    # 40 x 20: red | green | blue in 10 / 20 / 10 px. Shorter side 20 -> 10, so the image
    # becomes 20 x 10 and the centre crop keeps exactly the green middle.
    solid_stripes(tmp_path / "s.png", [(10, RED), (20, GREEN), (10, BLUE)], h=20)
    if not wide:  # the same picture turned on its side (20 wide x 40 tall)
        Image.open(tmp_path / "s.png").transpose(Image.Transpose.ROTATE_90).save(tmp_path / "s.png")
    write_lines(tmp_path, [row("s.png")])
    x = SURDDataset(tmp_path, resolution=10, random_flip=False)[0]["pixel_values"]
    assert x.shape == (3, 10, 10)
    inner = x[:, 1:-1, 1:-1]  # borders may blend with the neighbouring stripe
    assert torch.allclose(inner[1], torch.ones_like(inner[1]), atol=0.02)  # green
    assert torch.allclose(inner[0], -torch.ones_like(inner[0]), atol=0.02)  # no red
    assert torch.allclose(inner[2], -torch.ones_like(inner[2]), atol=0.02)  # no blue


def test_random_crop_is_seeded_and_varies(tmp_path):
    save_image(tmp_path / "a.png", w=40, h=8)  # height already 8: only the x offset varies
    write_lines(tmp_path, [row("a.png")])
    ds = SURDDataset(tmp_path, resolution=8, center_crop=False, random_flip=False)
    torch.manual_seed(3)
    a = ds[0]["pixel_values"]
    torch.manual_seed(3)
    assert torch.equal(a, ds[0]["pixel_values"])
    crops = set()
    for s in range(10):
        torch.manual_seed(s)
        crops.add(ds[0]["pixel_values"].numpy().tobytes())
    assert len(crops) > 1


def test_flip_uses_torch_rng(tmp_path):
    solid_stripes(tmp_path / "h.png", [(4, (0, 0, 0)), (4, (255, 255, 255))], h=8)
    write_lines(tmp_path, [row("h.png")])
    ds = SURDDataset(tmp_path, resolution=8, random_flip=True)
    seen = set()
    for s in range(20):
        torch.manual_seed(s)
        x = ds[0]["pixel_values"]
        torch.manual_seed(s)
        assert torch.equal(x, ds[0]["pixel_values"])  # same seed, same orientation
        flipped = bool(x[0, 0, 0] > 0)  # left column white
        torch.manual_seed(s)
        assert flipped == bool(torch.rand(1) < 0.5)  # one torch.rand draw decides
        seen.add(flipped)
    assert seen == {True, False}
    no_flip = SURDDataset(tmp_path, resolution=8, random_flip=False)
    for s in range(5):
        torch.manual_seed(s)
        assert no_flip[0]["pixel_values"][0, 0, 0] < 0


# ----------------------------------------------------------------- malformed rows
# Each case is written on line 3 (line 1 good, line 2 blank) and must be reported there.
MALFORMED = {
    "bad_json": ('{"file_name": "b.png", "text": "a red cube"', Reason.BAD_JSON, None),
    "not_object": ('["b.png", "a red cube", "x"]', Reason.NOT_OBJECT, None),
    "missing_key": (json.dumps({"file_name": "b.png", "text": "a red cube"}),
                    Reason.MISSING_KEY, "b.png"),
    "empty_text": (row("b.png", text=""), Reason.BAD_TEXT, "b.png"),
    "whitespace_prompt": (row("b.png", prompt=" \t "), Reason.BAD_PROMPT, "b.png"),
    "non_string_prompt": (row("b.png", prompt=3), Reason.BAD_PROMPT, "b.png"),
    "missing_file": (row("nope.png"), Reason.MISSING_FILE, "nope.png"),
    "missing_extension": (row("b"), Reason.MISSING_FILE, "b"),
    "corrupt_image": (row("corrupt.png"), Reason.BAD_IMAGE, "corrupt.png"),
    "truncated_png": (row("trunc.png"), Reason.BAD_IMAGE, "trunc.png"),
    "knowledge_missing": (row("b.png", text="an unknown prompt"), Reason.NO_KNOWLEDGE, "b.png"),
    "knowledge_width": (row("b.png", text="a wide prompt"), Reason.KNOWLEDGE_WIDTH, "b.png"),
    "knowledge_not_1d": (row("b.png", text="a matrix prompt"), Reason.KNOWLEDGE_NOT_1D, "b.png"),
}


def MALFORMED_index(case):
    return list(MALFORMED).index(case)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_row_raises_with_location(folder, case):
    line, reason, file_name = MALFORMED[case]
    meta = write_lines(folder, [row(), "", line, row("other.png", "a blue ball")])
    with pytest.raises(SURDError) as info:
        SURDDataset(folder, resolution=8, knowledge=knowledge())
    err, msg = info.value, str(info.value)
    assert str(meta) in msg and " line 3" in msg and reason in msg
    assert err.line == 3 and err.reason == reason and err.file_name == file_name
    if file_name is not None:
        assert f"(file {file_name!r})" in msg
    if case == "missing_extension":
        assert "extension" in msg and "authors' scraper" in msg and "b.png" in msg
    if case == "bad_json":
        assert "column 44" in msg
    if case == "knowledge_width":
        assert "width 7, expected 8" in msg and "line 1" in msg


def test_skip_mode_counts_each_reason_and_keeps_good_rows(folder):
    lines = [row()]
    for line, _, _ in MALFORMED.values():
        lines += [line, ""]
    lines.append(row("other.png", "a blue ball"))
    write_lines(folder, lines)
    with pytest.warns(UserWarning, match="skipped") as rec:
        ds = SURDDataset(folder, resolution=8, knowledge=knowledge(), on_error="skip")
    assert len(rec) == 1 and "\n" not in str(rec[0].message)  # one one-line summary
    assert [r["file_name"] for r in ds.rows] == ["good.png", "other.png"]
    rep = ds.report
    assert isinstance(rep, SURDReport)
    assert rep.n_ok == 2 and rep.n_lines == 2 + len(MALFORMED)
    expected = {}
    for _, reason, _ in MALFORMED.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert rep.counts == expected
    assert [s[0] for s in rep.skipped] == [2 + 2 * k for k in range(len(MALFORMED))]
    assert [s[2] for s in rep.skipped] == [r for _, r, _ in MALFORMED.values()]
    assert rep.skipped[MALFORMED_index("missing_file")][1] == "nope.png"
    assert rep.skipped[0][1] == ""  # bad JSON: file unknown
    assert len(rep.messages) == len(rep.skipped)
    summary = str(rep)
    assert f"2 of {2 + len(MALFORMED)} rows" in summary and "skipped" in summary
    assert "\n" not in summary
    assert len(ds[1]["pixel_values"]) == 3


def test_empty_after_skip_raises(folder):
    write_lines(folder, [row("nope.png"), "not json"])
    with pytest.raises(SURDError, match="empty") as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            SURDDataset(folder, resolution=8, on_error="skip")
    assert "metadata.jsonl" in str(info.value) and "2 skipped" in str(info.value)


def test_blank_lines_are_ignored_but_counted_for_line_numbers(folder):
    meta = folder / "metadata.jsonl"
    meta.write_text("\n   \n" + row() + "\r\n\n\t\n" + row("nope.png") + "\n\n", encoding="utf-8")
    with pytest.raises(SURDError, match=r"line 6 \(file 'nope.png'\)"):
        SURDDataset(folder, resolution=8)
    meta.write_text("\n" + row() + "\n\n" + row("other.png") + "\n\n\n", encoding="utf-8")
    ds = SURDDataset(folder, resolution=8)
    assert len(ds) == 2 and ds.lines == [2, 4] and ds.report.n_lines == 2


def test_only_blank_lines_is_empty(folder):
    write_lines(folder, ["", "  "])
    with pytest.raises(SURDError, match="empty"):
        SURDDataset(folder)


def test_missing_root_and_metadata(tmp_path):
    with pytest.raises(SURDError, match="folder not found") as info:
        SURDDataset(tmp_path / "nowhere")
    assert "nowhere" in str(info.value)
    with pytest.raises(SURDError, match="metadata file not found") as info:
        SURDDataset(tmp_path)
    assert str(tmp_path / "metadata.jsonl") in str(info.value)


def test_bad_arguments(folder):
    write_lines(folder, [row()])
    with pytest.raises(ValueError, match="on_error"):
        SURDDataset(folder, on_error="ignore")


def test_knowledge_dim_explicit(folder):
    write_lines(folder, [row(), row("other.png", "a blue ball")])
    ds = SURDDataset(folder, resolution=8, knowledge=knowledge(), knowledge_dim=8)
    assert ds.knowledge_dim == 8
    with pytest.raises(SURDError, match=r"line 1 \(file 'good.png'\).*width 8, expected 5"):
        SURDDataset(folder, resolution=8, knowledge=knowledge(), knowledge_dim=5)


def test_nonfinite_knowledge(folder):
    write_lines(folder, [row()])
    k = {"a red cube": torch.tensor([1.0, float("nan")])}
    with pytest.raises(SURDError, match="NaN"):
        SURDDataset(folder, knowledge=k)


def test_truncated_jpeg_needs_full_check(tmp_path):
    data = png_bytes(fmt="JPEG")
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    write_lines(tmp_path, [row("t.jpg")])
    with pytest.raises(SURDError, match=r"line 1 \(file 't.jpg'\): unreadable image"):
        SURDDataset(tmp_path, resolution=8, check_images="full")
    ds = SURDDataset(tmp_path, resolution=8, check_images=True)  # verify() cannot see it ...
    with pytest.raises(SURDError, match=r"line 1 \(file 't.jpg'\): unreadable image"):
        ds[0]  # ... but loading it fails with the same location


def test_check_images_false_defers_to_getitem(folder):
    write_lines(folder, [row("corrupt.png")])
    ds = SURDDataset(folder, resolution=8, check_images=False)
    with pytest.raises(SURDError, match=r"metadata.jsonl line 1 \(file 'corrupt.png'\)"):
        ds[0]


def test_max_samples_and_utf8_bom(folder):
    meta = write_lines(folder, [row(), row("other.png"), row("b.png"), "garbage after"])
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())
    ds = SURDDataset(folder, resolution=8, max_samples=2)
    assert [r["file_name"] for r in ds.rows] == ["good.png", "other.png"]


def test_write_metadata_roundtrip_utf8(tmp_path):
    save_image(tmp_path / "é.png")
    rows = [{"prompt": "日本の庭, 8k", "text": "un café é", "file_name": "é.png",
             "extra": 1}]
    path = write_metadata(tmp_path, rows)
    raw = path.read_text(encoding="utf-8")
    assert "日本の庭" in raw and "\\u" not in raw and raw.endswith("\n")
    assert list(json.loads(raw)) == ["file_name", "text", "prompt", "extra"]
    ds = SURDDataset(tmp_path, resolution=8)
    assert ds.rows == [rows[0]] and ds[0]["simple"] == "un café é"
    with pytest.raises(ValueError, match="prompt"):
        write_metadata(tmp_path, [{"file_name": "x.png", "text": "t"}])


# ----------------------------------------------------------------- hub loader (no network)
def fake_hub(monkeypatch, fn):
    mod = types.ModuleType("huggingface_hub")
    mod.snapshot_download = fn
    monkeypatch.setitem(sys.modules, "huggingface_hub", mod)


def test_load_surd_hub_offline_error_is_clear(monkeypatch):
    def offline(repo_id, repo_type=None, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    fake_hub(monkeypatch, offline)
    with pytest.raises(RuntimeError) as info:
        load_surd_hub()
    msg = str(info.value)
    assert "zhongshsh/SURD" in msg and "gated" in msg
    assert "huggingface-cli login" in msg and "network" in msg


def test_load_surd_hub_finds_metadata_folder(monkeypatch, tmp_path):
    snap = tmp_path / "snap"
    (snap / "train").mkdir(parents=True)
    save_image(snap / "train" / "good.png")
    write_lines(snap / "train", [row()])
    calls = []

    def fake(repo_id, repo_type=None, **kw):
        calls.append((repo_id, repo_type))
        return str(snap)

    fake_hub(monkeypatch, fake)
    ds = load_surd_hub(resolution=8)
    assert calls == [("zhongshsh/SURD", "dataset")] and len(ds) == 1
    assert ds.root == snap / "train"


def test_invalid_utf8_line(folder):
    meta = write_lines(folder, [row(), row("other.png")])
    latin1 = b'{"file_name": "b.png", "text": "caf\xe9", "prompt": "x"}\n'
    meta.write_bytes(meta.read_bytes() + latin1)
    with pytest.raises(SURDError, match=r"line 3: invalid JSON: not UTF-8"):
        SURDDataset(folder, resolution=8)
