"""Images in and out of the diffusion pool (`workers.images`): inline base64 in, checked
again before decoding; PNG files out, written atomically under a dated folder, named so
that two request ids never share a file."""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from omni_tasks import RequestValidationError
from workers.images import decode_image, png_name, save_png


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
        ("ok-id_1.2", "ok-id_1.2.png"),  # an ordinary id keeps its own name
        ("a/b c:d", "a%2Fb%20c%3Ad.png"),
        ("../../escape", "%2E.%2F..%2Fescape.png"),
        (".hidden", "%2Ehidden.png"),
        ("100%", "100%25.png"),
        ("ünï/çødé", "%C3%BCn%C3%AF%2F%C3%A7%C3%B8d%C3%A9.png"),
    ],
)
def test_save_png_encodes_the_name_and_stays_in_its_folder(
    tmp_path: Path, request_id: str, name: str
) -> None:
    path = save_png(gradient(), tmp_path, request_id)
    assert path.name == name
    assert path.parent.parent == tmp_path.resolve()


def test_two_request_ids_never_share_a_file(tmp_path: Path) -> None:
    """Replacing `/` by `_` would give `rel/collide` and `rel_collide` one file, the
    second image replacing the first's: each keeps its own picture."""
    first = save_png(gradient(size=(16, 16)), tmp_path, "rel/collide")
    second = save_png(gradient(size=(32, 16)), tmp_path, "rel_collide")
    assert first != second
    with Image.open(first) as a, Image.open(second) as b:
        assert (a.size, b.size) == ((16, 16), (32, 16))
    ids = ["rel/collide", "rel_collide", "rel%2Fcollide", "rel%2fcollide", "a.b", "a_b", "a b"]
    ids += ["x" * 128, "x" * 127 + "y", "é" * 128, "é" * 127 + "e", "%~", "." * 3]
    names = [png_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert all(len(n.encode()) <= 255 and "/" not in n and not n.startswith(".") for n in names)


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


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"GIF89a" + b"\x00" * 40, "not a PNG, JPEG or WebP image"),
        (b"not an image at all", "not a PNG, JPEG or WebP image"),
        (base64.b64decode(encoded(gradient()))[:60], "cannot be decoded"),  # truncated
    ],
)
def test_decode_image_refuses_what_is_not_an_image(payload: bytes, reason: str) -> None:
    with pytest.raises(RequestValidationError) as info:
        decode_image(base64.b64encode(payload).decode("ascii"))
    assert info.value.field == "image" and reason in str(info.value)


def test_decode_image_refuses_a_decompression_bomb_before_decoding_it() -> None:
    """A message that skipped the producer: the header's size is checked before pixels
    are allocated (5000x5000 here: over the 16 MP limit, a few kB on the wire)."""
    bomb = encoded(Image.new("L", (5000, 5000)))
    assert len(bomb) < 100_000
    with pytest.raises(RequestValidationError, match="5000x5000 pixels") as info:
        decode_image(bomb)
    assert info.value.field == "image"


def test_decode_image_refuses_text_that_is_not_base64() -> None:
    with pytest.raises(RequestValidationError) as info:
        decode_image("/etc/passwd")
    assert info.value.field == "image"
