"""Untrusted image bytes: judged by their header, decoded within a memory budget."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from components.io.images import (
    DecodeBudget,
    ImageBounds,
    ImageRefError,
    decode_image,
    probe,
    verify_image,
)
from tests.conftest import png_bytes, png_claiming

BOUNDS = ImageBounds(min_side=16, max_side=8192, max_frames=10)


def jpeg_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize(size).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


def gif_bytes(frames: int) -> bytes:
    images = [Image.new("RGB", (20, 20), (20 * i, 0, 0)) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:])
    return buffer.getvalue()


def code_of(call, *args, **kwargs) -> str:
    with pytest.raises(ImageRefError) as error:
        call(*args, **kwargs)
    return error.value.code


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (png_claiming(100_000, 100_000), "image_bomb"),  # Pillow's bomb error
        (png_claiming(10_000, 10_000), "image_bomb"),  # Pillow's bomb warning
        (png_claiming(9_000, 20), "image_too_large"),
        (png_claiming(20, 8), "image_too_small"),
        (gif_bytes(12), "image_too_many_frames"),
        (b"GIF89a not really", "image_undecodable"),
        (b"", "image_undecodable"),
    ],
    ids=["bomb-error", "bomb-warning", "too-wide", "too-small", "frames", "garbage", "empty"],
)
def test_headers_beyond_bounds_are_refused_without_decoding(data, code, decodes):
    assert code_of(probe, data, "x", BOUNDS) == code
    assert code_of(verify_image, data, "x", BOUNDS) == code
    assert code_of(decode_image, data, "x", BOUNDS) == code
    assert decodes == []  # not one pixel was decoded


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Every decode Pillow starts (ImageFile.load, where pixel data is read), by format."""
    from PIL import ImageFile

    started: list[str] = []
    load = ImageFile.ImageFile.load

    def counted(image):
        started.append(image.format)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    return started


def test_a_header_within_bounds_is_decoded_where_the_count_can_see_it(decodes):
    verify_image(png_bytes((40, 30)), "ok", BOUNDS)

    assert decodes == ["PNG"]  # the count above would see a decode


def test_a_header_within_bounds_is_read_not_decoded():
    header = probe(png_claiming(8000, 6000), "big.png", BOUNDS)  # its pixel data is 1x1

    assert (header.format, header.width, header.height, header.frames) == ("PNG", 8000, 6000, 1)


@pytest.mark.parametrize("make", [png_bytes, jpeg_bytes], ids=["png", "jpeg"])
def test_a_truncated_file_fails_the_full_decode(make):
    data = make((400, 300))
    truncated = data[: len(data) // 2]

    assert probe(truncated, "t", BOUNDS).width == 400  # the header alone looks fine
    assert code_of(verify_image, truncated, "t", BOUNDS) == "image_undecodable"
    assert verify_image(data, "t", BOUNDS).height == 300


@pytest.mark.parametrize(
    ("make", "size"),
    [
        # a JPEG decodes at a DCT scale of 1/1, 1/2, 1/4 or 1/8: 1/4 is the smallest that
        # keeps 2 x 224 = 448 pixels on the short side (3000 / 8 = 375 would not)
        (jpeg_bytes, (1000, 750)),
        # a PNG is reduced by the largest integer factor keeping 448: 3000 // 448 = 6
        (png_bytes, (667, 500)),
    ],
    ids=["jpeg", "png"],
)
def test_large_images_decode_reduced_to_twice_the_fit_with_their_aspect(make, size):
    image = decode_image(make((4000, 3000)), "big", BOUNDS, fit=224)

    assert image.mode == "RGB" and image.size == size


def test_a_large_palette_image_is_reduced_in_colour_not_in_palette_indices():
    """Black (index 0) and white (index 2) stripes: averaged as colours they are grey;
    averaged as indices they would be index 1, green."""
    stripes = np.zeros((900, 1200), np.uint8)
    stripes[:, 1::2] = 2
    image = Image.fromarray(stripes, mode="P")
    image.putpalette([0, 0, 0, 0, 255, 0, 255, 255, 255])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")

    decoded = decode_image(buffer.getvalue(), "p.png", BOUNDS, fit=224)

    assert min(decoded.size) < 900
    red, green, blue = decoded.getpixel((10, 10))
    assert abs(red - green) < 20 and abs(green - blue) < 20  # grey, not green


def test_small_images_decode_at_full_size():
    assert decode_image(png_bytes((300, 200)), "s", BOUNDS, fit=224).size == (300, 200)


def test_transparency_is_flattened_onto_white():
    buffer = io.BytesIO()
    Image.new("RGBA", (20, 10), (0, 0, 0, 0)).save(buffer, format="PNG")

    image = decode_image(buffer.getvalue(), "a.png")

    assert image.mode == "RGB" and image.size == (20, 10)
    assert image.getpixel((5, 5)) == (255, 255, 255)


def test_an_image_larger_than_the_whole_budget_is_refused():
    budget = DecodeBudget(1 << 20)  # 1 MiB: a 1000x1000 image needs 4 MB decoded

    assert code_of(verify_image, png_bytes((1000, 1000)), "b", BOUNDS, budget) == "image_too_large"
    assert verify_image(png_bytes((200, 200)), "s", BOUNDS, budget).width == 200


def test_the_budget_makes_a_decode_wait_until_its_bytes_fit():
    budget = DecodeBudget(100)
    events: list[str] = []
    holding, trying, b_in = threading.Event(), threading.Event(), threading.Event()

    def first():
        with budget.reserve(70, "a"):
            events.append("a in")
            holding.set()
            trying.wait(timeout=10)
            # b asked for its bytes while a holds 70 of 100: a budget that let it in would
            # let it in at once; this one must still be holding it back
            if b_in.wait(timeout=0.5):
                events.append("b got in while a held its bytes")
            events.append("a out")

    def second():
        holding.wait(timeout=10)
        trying.set()
        with budget.reserve(70, "b"):
            b_in.set()
            events.append("b in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert events == ["a in", "a out", "b in"]
