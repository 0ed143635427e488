"""Opening untrusted image bytes with bounded memory.

Every image the pipeline opens (validate, featurize, fine-tuning activations, served
image queries) goes through here:

1. `probe` reads only the header: format, size, frame count. An image beyond the bounds
   is refused with a reason code before a single pixel is decoded; Pillow's
   decompression-bomb error and warning become the reason `image_bomb`.
2. `decode_image` / `verify_image` decode within a `DecodeBudget`: a process-wide cap on
   the bytes of pixels being decoded at once, shared by every thread, so peak memory
   depends on the budget, not on how large the images are. JPEGs decode at a reduced
   DCT scale (draft mode) when a smaller image is all the caller needs; other formats
   are reduced by an integer factor right after decoding.
"""

from __future__ import annotations

import io
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# A bomb warning is a refusal, never a line on stderr: set once for the whole process.
warnings.simplefilter("error", Image.DecompressionBombWarning)

# Pillow keeps 8-bit multi-band images (RGB included) in 4 bytes per pixel.
BYTES_PER_PIXEL = 4
# Full-size copies that flattening transparency onto white makes at most (_to_rgb).
CONVERSION_COPIES = 4
# Modes whose pixel values can be averaged as they are (Image.reduce).
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


class ImageRefError(ValueError):
    """One image reference is bad; `code` is the quarantine reason."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class ImageBounds:
    """What an acceptable image is, judged from its header."""

    min_side: int = 16
    max_side: int = 8192
    max_frames: int = 1000


@dataclass(frozen=True)
class ImageHeader:
    format: str
    mode: str
    width: int
    height: int
    frames: int


class DecodeBudget:
    """A weighted semaphore over bytes of decoded pixels: a decode waits until its bytes
    fit beside those of the decodes already running. One decode larger than the whole
    budget is refused (`image_too_large`), so the cap holds for every input."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"a decode budget needs a positive capacity, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self._in_use = 0
        self._changed = threading.Condition()
        self._blocks_kept = False  # set on first use: importing this module changes nothing

    @contextmanager
    def reserve(self, nbytes: int, ref: str):
        if nbytes > self.capacity:
            raise ImageRefError(
                "image_too_large",
                f"{ref!r}: decoding needs {nbytes / 2**20:.0f} MiB, more than the decode "
                f"budget of {self.capacity / 2**20:.0f} MiB",
            )
        with self._changed:
            if not self._blocks_kept:
                _keep_freed_pixel_blocks(self.capacity)
                self._blocks_kept = True
            self._changed.wait_for(lambda: self._in_use + nbytes <= self.capacity)
            self._in_use += nbytes
        try:
            yield
        finally:
            with self._changed:
                self._in_use -= nbytes
                self._changed.notify_all()


def _keep_freed_pixel_blocks(nbytes: int) -> None:
    """Let Pillow keep up to `nbytes` of freed pixel blocks for the next image instead of
    freeing them: freed to glibc, whose heaps are per thread and ratchet their mmap
    threshold up after the first large free, decoded images leave RSS growing with image
    size times threads (measured in benchmarks/large_images.py). Only Pillow's blocks are
    affected (a global mmap threshold would also slow torch's CPU kernels 2x)."""
    blocks = -(-nbytes // Image.core.get_block_size())
    if blocks > Image.core.get_blocks_max():
        Image.core.set_blocks_max(blocks)


# The budget of code paths that are not given one (serving, fine-tuning activations).
DEFAULT_BUDGET = DecodeBudget(512 << 20)
# Bounds for images a validated catalog already accepted: only sizes no validation allows
# are refused here; memory is still capped by the budget.
TRUSTED_BOUNDS = ImageBounds(min_side=1, max_side=1 << 16, max_frames=1 << 16)

_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
# one wording wherever the limit is met (Pillow's own error names twice the limit)
_BOMB = (
    f"more pixels than the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} "
    "(a possible decompression bomb)"
)


def probe(data: bytes, ref: str, bounds: ImageBounds) -> ImageHeader:
    """The image's header, checked against `bounds`; nothing is decoded.

    Raises:
        ImageRefError: `image_undecodable`, `image_bomb`, `image_too_small`,
            `image_too_large` or `image_too_many_frames`.
    """
    with _opened(data, ref) as image:
        return _check_header(image, ref, bounds)


def verify_image(
    data: bytes, ref: str, bounds: ImageBounds, budget: DecodeBudget = DEFAULT_BUDGET
) -> ImageHeader:
    """Check the header, then decode the whole first frame within `budget`, keeping
    nothing. A JPEG decodes at 1/8 scale: every coefficient is still read, so a truncated
    or corrupt file still fails.

    Raises:
        ImageRefError: as `probe`, or `image_undecodable` when the data does not decode.
    """
    with _opened(data, ref) as image:
        header = _check_header(image, ref, bounds)
        if image.format == "JPEG":
            image.draft(image.mode, (1, 1))  # the smallest DCT scale
        with budget.reserve(_pixel_bytes(image.size), ref):
            image.load()  # decoder errors surface in _opened
            image.close()
    return header


def decode_image(
    data: bytes,
    ref: str,
    bounds: ImageBounds = TRUSTED_BOUNDS,
    budget: DecodeBudget = DEFAULT_BUDGET,
    fit: int | None = None,
) -> Image.Image:
    """Decode the first frame into an RGB image (transparency flattened onto white).

    `fit`: the side the caller will resize to. An image much larger than that decodes at
    a reduced JPEG scale or is reduced by an integer factor right after decoding, never
    below `2 * fit` on its shorter side, so the caller's own resampling still sees more
    pixels than it keeps.

    Raises:
        ImageRefError: as `verify_image`.
    """
    with _opened(data, ref) as image:
        _check_header(image, ref, bounds)
        if fit is not None and image.format == "JPEG":
            image.draft(image.mode, _reduced_size(image.size, fit))  # keeps >= that size
        factor = 1 if fit is None else min(image.size) // (2 * fit)
        factor = factor if factor >= 2 else 1
        # reduce() averages pixel values: a palette or bilevel image is converted first
        convert_first = factor > 1 and image.mode not in REDUCIBLE_MODES
        full = _pixel_bytes(image.size)
        nbytes = full * (2 if convert_first else 1) + CONVERSION_COPIES * full // factor**2
        with budget.reserve(nbytes, ref):
            image.load()  # decoder errors surface in _opened
            if factor > 1:
                source = image.convert("RGBA") if convert_first else image
                rgb = _to_rgb(source.reduce(factor))
            else:
                rgb = _to_rgb(image)
            image.close()  # the full-size pixels go before the budget is given back
            return rgb


def _pixel_bytes(size: tuple[int, int]) -> int:
    return size[0] * size[1] * BYTES_PER_PIXEL


@contextmanager
def _opened(data: bytes, ref: str):
    try:
        with Image.open(io.BytesIO(data)) as image:
            yield image
    except ImageRefError:
        raise
    except _BOMB_ERRORS:
        raise ImageRefError("image_bomb", f"{ref!r}: {_BOMB}") from None
    except UnidentifiedImageError:  # its message names an in-memory object, not the image
        raise ImageRefError(
            "image_undecodable", f"{ref!r}: not an image format read here"
        ) from None
    except _DECODE_ERRORS as err:
        raise ImageRefError("image_undecodable", f"{ref!r}: {err}") from None


def _check_header(image: Image.Image, ref: str, bounds: ImageBounds) -> ImageHeader:
    width, height = image.size
    header = ImageHeader(
        format=image.format or "unknown",
        mode=image.mode,
        width=width,
        height=height,
        frames=int(getattr(image, "n_frames", 1)),
    )
    if width * height > (Image.MAX_IMAGE_PIXELS or width * height):
        # Pillow warns before this line; its warning is an error unless a caller (a test
        # runner, say) reset the warning filters, so the same rule is applied here too
        raise ImageRefError("image_bomb", f"{ref!r}: {width}x{height} is {_BOMB}")
    if min(width, height) < bounds.min_side:
        raise ImageRefError(
            "image_too_small", f"{ref!r}: {width}x{height} < min_image_side {bounds.min_side}"
        )
    if max(width, height) > bounds.max_side:
        raise ImageRefError(
            "image_too_large", f"{ref!r}: {width}x{height} > max_image_side {bounds.max_side}"
        )
    if header.frames > bounds.max_frames:
        raise ImageRefError(
            "image_too_many_frames",
            f"{ref!r}: {header.frames} frames > max_image_frames {bounds.max_frames}",
        )
    return header


def _reduced_size(size: tuple[int, int], fit: int) -> tuple[int, int]:
    """The smallest size that keeps the aspect and `2 * fit` pixels on the shorter side."""
    width, height = size
    scale = min(1.0, 2 * fit / max(1, min(width, height)))
    return max(1, int(width * scale)), max(1, int(height * scale))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white: emoji and product shots are drawn on white."""
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
