# Licensed under the Apache License, Version 2.0 (the "License").
"""Image decoding: every PIL mode becomes RGB correctly, every way of storing an image is accepted,
EXIF orientation is applied, and unusable images are invalid rows with a stable reason.

Unit tests on `open_image`/`to_rgb`, plus the pixels of a batch the script's data path makes from image files.
"""

import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import collate_split, script_args
from run_lora_vlm import InvalidRowError, open_image, to_rgb

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
EXIF_ORIENTATION = 0x0112


def png_bytes(image: Image.Image, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save_kwargs)
    return buffer.getvalue()


def reopened(image: Image.Image, **save_kwargs) -> Image.Image:
    """The image as a decoder returns it from a PNG file: the form it has in a real dataset."""
    return Image.open(io.BytesIO(png_bytes(image, **save_kwargs)))


def half_transparent_rgba() -> Image.Image:
    """Left half opaque red, right half fully transparent (its hidden colour is black)."""
    image = Image.new("RGBA", (8, 4), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 4, 4))
    return image


def palette_with_transparency() -> Image.Image:
    """Palette image: index 0 (black) is transparent, index 1 is red; left half red."""
    image = Image.new("P", (8, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 4, 4))
    image.info["transparency"] = 0
    return reopened(image, transparency=0)


def palette_opaque() -> Image.Image:
    image = Image.new("P", (8, 4), 0)
    image.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 4, 4))
    return reopened(image)


def grey_alpha() -> Image.Image:
    """LA: left half opaque black, right half transparent."""
    image = Image.new("LA", (8, 4), (0, 0))
    image.paste((0, 255), (0, 0, 4, 4))
    return reopened(image)


def grey_16bit() -> Image.Image:
    """I;16 with values across the whole 16-bit range, as a 16-bit greyscale PNG decodes."""
    values = np.array([[0, 16384, 32768, 65535]] * 2, dtype=np.uint16)
    return reopened(Image.fromarray(values))


def cmyk_jpeg() -> Image.Image:
    image = Image.new("CMYK", (8, 4), (0, 255, 255, 0))  # pure red in CMYK
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return Image.open(io.BytesIO(buffer.getvalue()))


def rgba_palette_in_memory() -> Image.Image:
    """A P image whose palette itself is RGBA (what quantizing an RGBA image gives), never saved."""
    return half_transparent_rgba().quantize()


def grey_with_transparent_key() -> Image.Image:
    """L with a tRNS chunk: grey level 50 is transparent (PNG's colour-key transparency)."""
    image = Image.new("L", (8, 4), 50)
    image.paste(200, (0, 0, 4, 4))
    return reopened(image, transparency=50)


# (name, image factory, {(x, y): expected RGB}): left half at x=1, right half at x=6.
MODE_CASES = [
    ("RGB", lambda: reopened(Image.new("RGB", (8, 4), (10, 20, 30))), {(1, 1): (10, 20, 30)}),
    ("P", palette_opaque, {(1, 1): RED, (6, 1): BLUE}),
    ("P+transparency", palette_with_transparency, {(1, 1): RED, (6, 1): WHITE}),
    ("P+RGBA palette", rgba_palette_in_memory, {(1, 1): RED, (6, 1): WHITE}),
    ("RGBA", lambda: reopened(half_transparent_rgba()), {(1, 1): RED, (6, 1): WHITE}),
    ("LA", grey_alpha, {(1, 1): (0, 0, 0), (6, 1): WHITE}),
    ("L", lambda: reopened(Image.new("L", (8, 4), 100)), {(1, 1): (100, 100, 100)}),
    ("L+transparency", grey_with_transparent_key, {(1, 1): (200, 200, 200), (6, 1): WHITE}),
    ("1", lambda: reopened(Image.new("1", (8, 4), 1)), {(1, 1): WHITE}),
    # Scaled from the 16-bit range: clipping would turn 16384 and 32768 into 255.
    ("I;16", grey_16bit, {(0, 0): (0, 0, 0), (1, 0): (64, 64, 64), (2, 0): (128, 128, 128), (3, 0): WHITE}),
    ("CMYK", cmyk_jpeg, {(1, 1): RED}),
]


@pytest.mark.parametrize("name,make,expected", MODE_CASES, ids=[case[0] for case in MODE_CASES])
def test_any_mode_becomes_rgb(name, make, expected):
    source = make()
    converted = to_rgb(source)
    assert converted.mode == "RGB"
    assert converted.size == source.size
    for (x, y), colour in expected.items():
        assert converted.getpixel((x, y)) == pytest.approx(colour, abs=3), f"{name} pixel {(x, y)}"


def test_partial_alpha_blends_with_white():
    image = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert to_rgb(image).getpixel((0, 0)) == pytest.approx((127, 127, 127), abs=2)


def test_rgb_is_returned_unchanged():
    image = Image.new("RGB", (2, 2), RED)
    assert to_rgb(image) is image


# --- where the image comes from ------------------------------------------------------------------


@pytest.fixture
def red_png(tmp_path):
    """A red PNG at tmp_path/imgs/red.png; returns its path relative to tmp_path."""
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (6, 5), RED).save(tmp_path / "imgs" / "red.png")
    return "imgs/red.png"


SOURCES = {
    "absolute path": lambda base, rel: str(base / rel),
    "relative path": lambda base, rel: rel,
    "bytes": lambda base, rel: (base / rel).read_bytes(),
    "bytearray": lambda base, rel: bytearray((base / rel).read_bytes()),
    "dict with bytes": lambda base, rel: {"bytes": (base / rel).read_bytes(), "path": None},
    "dict with bytes and a stale path": lambda base, rel: {"bytes": (base / rel).read_bytes(), "path": "gone.png"},
    "dict with relative path": lambda base, rel: {"bytes": None, "path": rel},
    "PIL image": lambda base, rel: Image.open(base / rel),
    "PIL image, palette mode": lambda base, rel: Image.open(base / rel).convert("P"),
}


@pytest.mark.parametrize("source", list(SOURCES))
def test_image_sources(source, tmp_path, red_png):
    image = open_image(SOURCES[source](tmp_path, red_png), base_dir=tmp_path)
    assert image.mode == "RGB" and image.size == (6, 5)
    assert image.getpixel((2, 2)) == RED


# Orientation 6: shown turned 90 degrees clockwise (the left half goes on top); 3: turned 180 degrees.
@pytest.mark.parametrize(
    "orientation,size,red_at,blue_at", [(6, (20, 40), (10, 5), (10, 35)), (3, (40, 20), (30, 10), (10, 10))]
)
@pytest.mark.parametrize("as_file", [True, False], ids=["file", "bytes"])
def test_exif_orientation_is_applied(orientation, size, red_at, blue_at, as_file, tmp_path):
    """A 40x20 JPEG, left half red and right half blue, tagged to be shown rotated."""
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    path = tmp_path / "rotated.jpg"
    stored.save(path, "JPEG", exif=exif, quality=95)
    image = open_image("rotated.jpg" if as_file else path.read_bytes(), base_dir=tmp_path)
    assert image.size == size
    assert image.getpixel(red_at) == pytest.approx(RED, abs=8)
    assert image.getpixel(blue_at) == pytest.approx(BLUE, abs=8)


# --- unusable images -----------------------------------------------------------------------------


def truncated_png(base):
    data = png_bytes(Image.effect_noise((64, 64), 50))
    return data[: len(data) // 2]


BAD_IMAGES = {
    "missing relative file": (lambda base: "imgs/nope.png", "image_missing"),
    "missing absolute file": (lambda base: str(base / "nope.png"), "image_missing"),
    "dict with a missing path": (lambda base: {"bytes": None, "path": "nope.png"}, "image_missing"),
    "a folder, not a file": (lambda base: ".", "image_missing"),
    "None": (lambda base: None, "image_missing"),
    "empty string": (lambda base: "", "image_missing"),
    "empty dict": (lambda base: {"bytes": None, "path": None}, "image_missing"),
    "corrupt bytes": (lambda base: b"this is not an image", "image_unreadable"),
    "corrupt bytes in a dict": (lambda base: {"bytes": b"\x89PNG garbage", "path": None}, "image_unreadable"),
    "truncated PNG": (truncated_png, "image_unreadable"),
    "file that is not an image": (lambda base: "notes.png", "image_unreadable"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_unusable_images_are_invalid_rows(case, tmp_path):
    (tmp_path / "notes.png").write_text("just text")
    make, reason = BAD_IMAGES[case]
    with pytest.raises(InvalidRowError) as raised:
        open_image(make(tmp_path), base_dir=tmp_path)
    assert raised.value.reason == reason


# --- through the whole pipeline ------------------------------------------------------------------


def test_pixels_the_model_sees(processor, tmp_path):
    """JSONL rows whose image files need conversion: the batch's pixels show white backgrounds.

    The tiny processor normalizes with mean = std = 0.5, so white is +1 and black -1 in every channel.
    """
    images = {
        "rgba.png": Image.new("RGBA", (32, 32), (0, 0, 0, 0)),  # fully transparent: white
        "la.png": Image.new("LA", (32, 32), (0, 0)),  # fully transparent: white
        "grey16.png": Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16)),  # full scale: white
        "cmyk.jpg": Image.new("CMYK", (32, 32), (0, 255, 255, 0)),  # red
    }
    expected_channels = {"rgba.png": (1, 1, 1), "la.png": (1, 1, 1), "grey16.png": (1, 1, 1), "cmyk.jpg": (1, -1, -1)}
    rows = []
    for name, image in images.items():
        image.save(tmp_path / name)
        rows.append({"image": name, "question": f"What is in {name}?", "answer": "Nothing."})
    data_file = tmp_path / "data.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    _, batch = collate_split(processor, script_args("--do_train", dataset=str(data_file)))
    pixel_values = batch["pixel_values"]
    assert pixel_values.shape[0] == len(rows)
    for index, name in enumerate(images):
        means = pixel_values[index].mean(dim=(1, 2)).tolist()
        assert means == pytest.approx(expected_channels[name], abs=0.05), name


def test_an_image_past_the_pixel_limit_is_an_invalid_row(monkeypatch, tmp_path):
    """Pillow refuses images over twice MAX_IMAGE_PIXELS with DecompressionBombError, which is no OSError."""
    Image.new("RGB", (64, 64), RED).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InvalidRowError) as raised:
        open_image("big.png", base_dir=tmp_path)
    assert raised.value.reason == "image_unreadable"
