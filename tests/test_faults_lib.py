"""Library-level fault handling: damaged inputs give one ValueError that names the file and the fix
(convert-inception's .pth, image files and folders, metrics.jsonl), and eval.json is strict JSON."""
import json
import math
import os
import pickle
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ttfm_np import data, evaluate, fid, images, inception, jsonio, torch_reader

from test_torch_reader import torchless_zip

# ----------------------------------------------------------------------------
# convert-inception: files that are not pytorch-fid's weights
# ----------------------------------------------------------------------------

NOT_INCEPTION = (r"is not pytorch-fid's Inception weights file pt_inception-2015-12-05-6726825d\.pth: .*; "
                 r"download it from https://github\.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 r"pt_inception-2015-12-05-6726825d\.pth$")


def _convert(pth, tmp_path):
    inception.convert_weights(str(pth), str(tmp_path / "out.h5"))


def _forbidden_global_pickle(path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))
    with open(path, "wb") as f:                        # a legacy-format file whose object pickle calls os.system
        for obj in (torch_reader.LEGACY_MAGIC, torch_reader.LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(obj, f)
        pickle.dump({"w": Evil()}, f)


def test_convert_refuses_damaged_and_foreign_pth_files(tmp_path, rng):
    pth = tmp_path / "weights.pth"
    cases = {
        "empty": lambda: pth.write_bytes(b""),
        "random bytes": lambda: pth.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()),
        "forbidden global": lambda: _forbidden_global_pickle(pth),
        "truncated zip": lambda: (torchless_zip(pth, {"w": rng.standard_normal(500).astype(np.float32)}),
                                  pth.write_bytes(pth.read_bytes()[:700])),
        "another state dict": lambda: torchless_zip(pth, {"fc.weight": np.ones((2, 2), np.float32)}),
        "not a dict": lambda: pth.write_bytes(b"".join(pickle.dumps(v, protocol=2) for v in
                                                       (torch_reader.LEGACY_MAGIC, torch_reader.LEGACY_PROTOCOL,
                                                        {}, [1, 2], []))),
    }
    reasons = {"empty": "is empty", "random bytes": "not a (readable )?PyTorch", "forbidden global": "refused",
               "truncated zip": "not a readable PyTorch weights file", "another state dict": "missing 94 of 94",
               "not a dict": "holds a list, not a state dict"}
    for name, make in cases.items():
        make()
        with pytest.raises(ValueError, match=re.escape(str(pth)) + " " + NOT_INCEPTION) as err:
            _convert(pth, tmp_path)
        assert re.search(reasons[name], str(err.value)), (name, str(err.value))
        assert not (tmp_path / "out.h5").exists(), name                 # nothing half-written
    assert not os.path.exists("/dev/null.pwned")


def test_convert_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth does not exist"):
        _convert(tmp_path / "nope.pth", tmp_path)


# ----------------------------------------------------------------------------
# Image files and folders
# ----------------------------------------------------------------------------

def _png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bomb_png(path, width=100_000, height=100_000):
    """A ~100-byte PNG whose header claims width x height RGB pixels (10^10: 30 GB decoded)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))


def _good_pngs(folder, rng, n=3, size=(12, 10)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_open_rgb_reads_a_good_image_exactly(tmp_path, rng):
    pixels = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    im = images.open_rgb(str(tmp_path / "a.png"))
    assert im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), pixels)


def test_decompression_bomb_header_is_refused_everywhere(tmp_path, rng):
    folder = tmp_path / "imgs"
    _good_pngs(folder, rng)
    _bomb_png(folder / "img1.png")
    bomb = str(folder / "img1.png")
    for read in (lambda: images.open_rgb(bomb), lambda: data.load_imagefolder(str(folder), 8),
                 lambda: fid.read_images(fid.png_files(str(folder))),
                 lambda: next(fid.iter_png_batches(fid.png_files(str(folder)), 8))):
        with pytest.raises(ValueError, match=re.escape(bomb) + " is refused as a possible decompression bomb "
                                             ".*10000000000 pixels.*remove the file"):
            read()


def test_pillows_warning_range_is_an_error_too(tmp_path, rng, monkeypatch):
    """Between MAX_IMAGE_PIXELS and twice it pillow only warns; here that is an error as well."""
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "big.png")   # 120 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="big.png is refused as a possible decompression bomb"):
        images.open_rgb(str(tmp_path / "big.png"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)         # beyond 2x: pillow's own error
    with pytest.raises(ValueError, match="big.png is refused as a possible decompression bomb"):
        images.open_rgb(str(tmp_path / "big.png"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 120)        # at the limit: fine
    assert images.open_rgb(str(tmp_path / "big.png")).size == (12, 10)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "bad crc"])
def test_unreadable_image_files_are_named(tmp_path, rng, damage):
    folder = tmp_path / "imgs"
    _good_pngs(folder, rng, size=(40, 40))
    bad = folder / "img2.png"
    raw = bad.read_bytes()
    bad.write_bytes({"garbage": b"this is not a png" * 5, "truncated": raw[:len(raw) // 2], "empty": b"",
                     "bad crc": raw[:40] + bytes([raw[40] ^ 0xFF]) + raw[41:]}[damage])
    for read in (lambda: data.load_imagefolder(str(folder), 8), lambda: fid.read_images(fid.png_files(str(folder)))):
        with pytest.raises(ValueError, match=re.escape(str(bad)) + " is not a readable image .*remove or replace"):
            read()


def test_image_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no pictures here")
    (tmp_path / "sub").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no images .* found under {re.escape(str(tmp_path))} "
                                                "\\(subfolders included\\); put image files there"):
        data.load_imagefolder(str(tmp_path), 8)
    with pytest.raises(FileNotFoundError, match="no PNG/JPG images"):
        fid.png_files(str(tmp_path))


# ----------------------------------------------------------------------------
# JSON: metrics.jsonl in, eval.json out
# ----------------------------------------------------------------------------

def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [{"step": i, "loss": 1.0 / i} for i in range(1, 7)]
    lines = [json.dumps(r) for r in good]
    path.write_text("\n".join(lines) + "\n\n")
    assert jsonio.read_jsonl(path) == good                               # blank lines skipped
    path.write_text("\n".join(lines) + '\n{"step": 7, "lo')               # a run killed mid-line
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} line 7 is not JSON \\(Unterminated string.*"
                                         "column 13\\).*repair or delete that line"):
        jsonio.read_jsonl(path)
    path.write_text("\n".join(lines[:2] + ["[1, 2]"] + lines[2:]))
    with pytest.raises(ValueError, match="line 3 is JSON but not an object \\(list\\)"):
        jsonio.read_jsonl(path)
    path.write_text('{"step": 1, "loss": NaN}\n')                         # a diverged loss is still readable
    assert math.isnan(jsonio.read_jsonl(path)[0]["loss"])


def _strict_loads(text):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_eval_json_is_strict_json_and_says_what_was_null(tmp_path):
    rows = [{"method": "teacher", "steps": 4, "mse": 0.0, "psnr": float("inf")},
            {"method": "student", "steps": 1, "mse": np.float64(0.01), "psnr": np.float64(20.0)},
            {"method": "broken", "steps": 1, "mse": float("nan"), "psnr": -float("inf")}]
    evaluate.write_outputs(str(tmp_path), rows, {}, image_data=True, extra={"n": 8})
    out = _strict_loads((tmp_path / "eval.json").read_text())          # no Infinity / NaN tokens
    assert out["rows"][0]["psnr"] is None and out["rows"][1]["psnr"] == 20.0 and out["rows"][0]["mse"] == 0.0
    assert out["rows"][2]["mse"] is None and out["n"] == 8
    note = out["non_finite_as_null"]
    assert note["values"] == {"rows[0].psnr": "inf", "rows[2].mse": "nan", "rows[2].psnr": "-inf"}
    assert "psnr is +inf where the samples equal the reference exactly" in note["why"]


def test_dump_json_without_non_finite_values_adds_nothing(tmp_path):
    with open(tmp_path / "x.json", "w") as f:
        assert jsonio.dump_json({"a": [1.5, {"b": np.float32(2.0)}]}, f) == {}
    assert _strict_loads((tmp_path / "x.json").read_text()) == {"a": [1.5, {"b": 2.0}]}
