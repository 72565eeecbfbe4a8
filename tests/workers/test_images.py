"""Images in and out of the diffusion pool (`workers.images`): base64 in, PNG files out,
written atomically under a dated folder with a sanitised name."""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from workers.images import decode_image, save_png


def encoded(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def gradient(mode: str = "RGB", size: tuple[int, int] = (24, 16)) -> Image.Image:
    width, height = size
    rgb = Image.new("RGB", size)
    rgb.putdata(
        [
            ((x * 10) % 256, y * 10, 255 - (x * 10) % 256)
            for y in range(height)
            for x in range(width)
        ]
    )
    return rgb if mode == "RGB" else rgb.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_decode_image_gives_the_pixels_as_rgb(mode: str) -> None:
    original = gradient(mode)
    decoded = decode_image(encoded(original))
    assert decoded.mode == "RGB" and decoded.size == (24, 16)
    assert decoded.tobytes() == original.convert("RGB").tobytes()


def test_decode_image_of_a_jpeg() -> None:
    decoded = decode_image(encoded(gradient(), fmt="JPEG"))
    assert decoded.mode == "RGB" and decoded.size == (24, 16)


def test_save_png_writes_a_png_under_a_dated_folder(tmp_path: Path) -> None:
    image = gradient()
    path = save_png(image, tmp_path / "out", "req-1")
    assert path.is_absolute() and path.name == "req-1.png"
    assert path.parent.parent == (tmp_path / "out").resolve()
    assert re.fullmatch(r"\d{8}", path.parent.name)  # YYYYMMDD
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == (24, 16)
        assert saved.convert("RGB").tobytes() == image.tobytes()
    assert os.listdir(path.parent) == ["req-1.png"]  # no temporary file left


def test_save_png_expands_the_home_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    path = save_png(gradient(), Path("~/outputs"), "home")
    assert path.parent.parent == (tmp_path / "outputs").resolve()


@pytest.mark.parametrize(
    ("request_id", "name"),
    [
        ("a/b c:d", "a_b_c_d.png"),
        ("../../escape", ".._.._escape.png"),
        ("ok-id_1.2", "ok-id_1.2.png"),
        ("ünï/çødé", "ünï_çødé.png"),
    ],
)
def test_save_png_sanitises_the_name_and_stays_in_its_folder(
    tmp_path: Path, request_id: str, name: str
) -> None:
    path = save_png(gradient(), tmp_path, request_id)
    assert path.name == name
    assert path.parent.parent == tmp_path.resolve()


def test_save_png_replaces_an_earlier_file_by_renaming(tmp_path: Path) -> None:
    first = save_png(gradient(size=(16, 16)), tmp_path, "again")
    inode = first.stat().st_ino
    with open(first, "rb") as reader:  # a reader holding the earlier file
        second = save_png(gradient(size=(32, 16)), tmp_path, "again")
        with Image.open(reader) as old:
            assert old.size == (16, 16)  # it still reads the whole earlier picture
    assert second == first and second.stat().st_ino != inode  # a new file moved in
    with Image.open(second) as new:
        assert new.size == (32, 16)
    assert os.listdir(first.parent) == ["again.png"]
