"""The one preprocessing module: training, evaluation, export verification and the handlers import it.

Two layers:
- decoding: request bytes -> a PIL image, with byte and pixel limits checked *before* pixels are
  decoded (Pillow's own decompression-bomb guard stays on; nothing here changes process-wide state);
- presets: small callables with keyword-only settings that turn a decoded image (or, for training
  data that is already an array, the array) into the exact tensor the model was trained on, as a float32 NumPy
  array. They need no torch: a worker serving an ONNX model runs them without it (the CPU image has none).
  Resizing is Pillow's bilinear resampling, antialiased when it shrinks (its filter widens with the scale; torch's
  `antialias=True` follows the same scheme).

A preset is described by a JSON-able dict ({"name": "digits", "size": 32, ...}) that is stored in
the checkpoint and the export manifest, so the server rebuilds the same preset the model saw.
"""

from __future__ import annotations

import io
import warnings
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class InvalidImage(ValueError):
    """The bytes are not an image this service can decode."""


class ImageTooLarge(InvalidImage):
    """The image declares more pixels than the model's configured limit."""


# Modes whose pixel values are wider than 8 bits; scaled to [0, 1] by their full range.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def decode_image(data: bytes, *, max_pixels: int, draft: tuple[int, int] | None = None, min_side: int = 1,
                 max_aspect: float | None = None, allow_animated: bool = True,
                 charge: Callable[[int], None] | None = None) -> Image.Image:
    """Decode `data` into a loaded PIL image, refusing anything over `max_pixels` before decoding it.

    Raises InvalidImage for empty, truncated, corrupt or non-image bytes, for a side under `min_side`, a
    ratio of long to short side over `max_aspect` and, unless `allow_animated`, for an image of several
    frames (animated GIF, WebP or PNG: which frame is meant is ambiguous); and ImageTooLarge for images
    whose header declares more than `max_pixels` pixels (a decompression bomb is refused from its header).
    `draft` (width, height): a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that still covers
    it (libjpeg's DCT scaling), which costs a fraction of a full decode of a large photo. `charge`, when given,
    is called with the pixels about to be decoded (after that scaling) before any is, and may raise to refuse.
    """
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns (then errors) past its own global limit; ours is per model and stricter.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width < 1 or height < 1:
                raise InvalidImage(f"the image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"the image is {width}x{height} = {width * height} pixels; this model accepts at most {max_pixels}"
                )
            if min(width, height) < min_side:
                raise InvalidImage(f"the image is {width}x{height}; this model needs at least {min_side} pixels a side")
            if max_aspect is not None and max(width, height) > max_aspect * min(width, height):
                raise InvalidImage(f"the image is {width}x{height}, an aspect ratio over {max_aspect:g}:1")
            if not allow_animated and getattr(image, "n_frames", 1) > 1:
                raise InvalidImage(f"the image is animated ({image.n_frames} frames); send a single still image")
            if draft is not None and image.format == "JPEG":
                image.draft(None, draft)
            if charge is not None:
                charge(image.size[0] * image.size[1])
            image.load()
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(f"the image is too large to decode safely: {err}") from None
    except UnidentifiedImageError:
        raise InvalidImage("the bytes are not a recognised image format (PNG, JPEG, GIF, BMP, WebP, TIFF, ...)") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, KeyError, IndexError) as err:
        # Pillow's plugins raise all of these for malformed files (a TIFF with no width tag: KeyError, then
        # TypeError "Missing dimensions"; found by tests/ops/test_fuzz.py)
        raise InvalidImage(f"the image could not be decoded (truncated or corrupt): {err}") from None
    return image


def _full_range(mode: str, peak: float) -> float:
    """The value that means 'white' for a wide mode: 16-bit integers span 0..65535; float images
    are taken as [0, 1], [0, 255] or [0, 65535], whichever their peak fits."""
    if mode != "F":
        return 65535.0
    for limit in (1.0, 255.0, 65535.0):
        if peak <= limit:
            return limit
    return peak


def _onto_white(image: Image.Image) -> Image.Image:
    """A transparent image composited onto white paper (RGBA); any other image as it is."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image


def to_gray_array(image: Image.Image) -> np.ndarray:
    """Any PIL image -> (H, W) float32 in [0, 1], with EXIF rotation applied.

    Transparent images are composited onto white first (a transparent canvas reads as paper);
    16-bit and 32-bit grayscale is scaled by its full range rather than clipped at 255.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_MODES:
        array = np.asarray(image, dtype=np.float32)
        return np.clip(array / _full_range(image.mode, float(array.max(initial=0.0))), 0.0, 1.0)
    return np.asarray(_onto_white(image).convert("L"), dtype=np.float32) / 255.0


def resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` at `size` (width, height): bilinear, antialiased when it shrinks; unchanged when it has that size."""
    return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)


class _Preset:
    def torchvision_transforms(self) -> Callable[[Image.Image], Any]:
        """The same preprocessing as one torchvision Compose over a PIL image, for TorchServe's stock VisionHandler
        (the bench's peer): the preset itself, its array made a tensor."""
        import torch
        from torchvision.transforms import v2

        return v2.Compose([v2.Lambda(self), v2.Lambda(torch.from_numpy)])


class DigitsPreset(_Preset):
    """Grayscale digit -> (1, size, size) tensor normalised like the training data.

    The training data (scikit-learn's digits) is white ink on black. People draw dark ink on light
    paper. The preset makes both look alike:
    1. polarity: the background is the median of the border pixels; a light background is inverted,
       so ink is always bright;
    2. contrast: the background level maps to 0 and the brightest ink to 1 (grey paper, faint pens);
    3. framing: the ink's bounding box (pixels above `ink_threshold`) is centred on a square canvas
       with `margin` of its side on every edge, so a small digit in a big canvas fills the frame as
       the training digits do;
    4. resize to `size` x `size` (bilinear, antialiased: `resized`), then (x - mean) / std.
    A blank image yields an all-background tensor; it is still a valid input.
    """

    def __init__(
        self, *, size: int = 32, margin: float = 0.15, mean: float = 0.5, std: float = 0.5, ink_threshold: float = 0.25
    ) -> None:
        if size < 8:
            raise ValueError(f"size must be at least 8 pixels, got {size}")
        if not 0.0 <= margin < 0.5:
            raise ValueError(f"margin is a fraction of the digit's side in [0, 0.5), got {margin}")
        if std <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.size, self.margin, self.mean, self.std, self.ink_threshold = size, margin, mean, std, ink_threshold

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A decoded image of any mode and size -> (1, size, size) float32."""
        return self.from_array(to_gray_array(image))

    def from_array(self, gray: np.ndarray) -> np.ndarray:
        """(H, W) intensities in [0, 1], either polarity -> (1, size, size) float32."""
        x = np.asarray(gray, dtype=np.float32)  # (H, W)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D grayscale array, got shape {tuple(x.shape)}")
        border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
        background = np.partition(border, (border.size - 1) // 2)[(border.size - 1) // 2]  # lower median
        if background > 0.5:
            x, background = 1.0 - x, np.float32(1.0) - background
        peak = x.max()
        if peak - background <= 1e-6:
            x = np.zeros_like(x)
        else:
            x = np.clip((x - background) / (peak - background), 0.0, 1.0)
        canvas = resized(Image.fromarray(self._frame(x), mode="F"), (self.size, self.size))
        out = np.asarray(canvas, dtype=np.float32)
        return ((out - np.float32(self.mean)) / np.float32(self.std))[None]  # (1, size, size)

    def _frame(self, x: np.ndarray) -> np.ndarray:
        """Crop to the ink's bounding box and centre it on a square canvas with a margin."""
        ink = x > self.ink_threshold
        rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
        if rows.size:
            x = x[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        height, width = x.shape
        side = max(height, width)
        pad = int(round(side * self.margin))
        canvas = np.zeros((side + 2 * pad, side + 2 * pad), dtype=np.float32)
        top, left = pad + (side - height) // 2, pad + (side - width) // 2
        canvas[top : top + height, left : left + width] = x
        return canvas


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> RGB with EXIF rotation applied; transparency is composited onto white,
    16-bit grayscale is scaled by its range, CMYK and palette images are converted by Pillow."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_MODES:
        return Image.fromarray((to_gray_array(image) * 255).round().astype(np.uint8)).convert("RGB")
    image = _onto_white(image)
    return image if image.mode == "RGB" else image.convert("RGB")


class _ColourPreset(_Preset):
    """A preset that makes its array from an RGB PIL image (`from_rgb`), whatever image it is given; per channel,
    (x / 255 - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A decoded image of any mode and size -> the model's input array."""
        return self.from_rgb(to_rgb(image))

    def from_array(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 (the generated training data) -> the model's input array."""
        return self.from_rgb(Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB"))

    def from_rgb(self, rgb: Image.Image) -> np.ndarray:
        raise NotImplementedError

    def normalise(self, images: Any) -> Any:
        """(..., 3, H, W) uint8 -> float32 (x / 255 - mean) / std: a NumPy array, or a torch tensor on its own device
        (the scene models' training loop, a batch at a time) by the same float32 steps."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
        if isinstance(images, np.ndarray):
            return (images.astype(np.float32) / np.float32(255) - mean) / std
        import torch

        return (images.float() / 255 - torch.from_numpy(mean).to(images.device)) / torch.from_numpy(std).to(images.device)

    def _planes(self, rgb: Image.Image) -> np.ndarray:
        """An RGB image -> (3, H, W) float32, normalised, C-contiguous (a compiled model, AOTInductor's, reads its
        input in that layout whatever its strides say)."""
        return np.ascontiguousarray(self.normalise(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)))


class RGBPreset(_ColourPreset):
    """Colour image -> (3, crop, crop) array, torchvision-reference style: resize the shorter side to `resize`
    (antialiased, on uint8, before any float conversion; the longer side in proportion, rounded down), centre crop
    `crop`, scale to [0, 1], normalise by `mean` and `std` per channel.

    `draft_size` lets the decoder shrink large JPEGs by DCT scaling to no less than the resize target,
    so a 1920x1080 photo is decoded at 1/8 of its size at a fraction of the cost."""

    def __init__(self, *, resize: int = 128, crop: int = 128, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 std: tuple[float, ...] = (0.25, 0.25, 0.25)) -> None:
        if crop > resize:
            raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std positive; got {mean}, {std}")
        self.resize, self.crop, self.mean, self.std = resize, crop, tuple(mean), tuple(std)
        self.draft_size = (resize, resize)

    def from_rgb(self, rgb: Image.Image) -> np.ndarray:
        """An RGB image -> (3, crop, crop) float32."""
        width, height = rgb.size
        long = int(self.resize * max(width, height) / min(width, height))
        size = (self.resize, long) if width <= height else (long, self.resize)
        rgb = resized(rgb, size)
        left, top = int(round((size[0] - self.crop) / 2.0)), int(round((size[1] - self.crop) / 2.0))
        return self._planes(rgb.crop((left, top, left + self.crop, top + self.crop)))

    def _planes(self, rgb: Image.Image) -> np.ndarray:
        """An RGB image -> (3, H, W) float32, C-contiguous, scaled as torchvision's ToDtype(scale=True) scales (times
        the float32 reciprocal of 255) and then normalised as its Normalize does: the floats of the torchvision
        reference transforms this preset follows, so a model trained with them is served the same input."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
        planes = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) * np.float32(1.0 / 255)
        return np.ascontiguousarray((planes - mean) / std)


def shown_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of a decoded image as it is shown, after its EXIF orientation (which to_rgb applies)."""
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation: 5 to 8 turn the image a quarter
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


class LetterboxPreset(_ColourPreset):
    """Colour image of any size -> (3, size, size) array for the scene models (detector, segmenter): scaled, aspect
    kept, so its long side is `size` (antialiased, on uint8), placed at the top left of the square, the rest padded
    with the mean colour (0 after normalising), then scaled to [0, 1] and normalised by `mean` and `std`.

    Top-left placement keeps the way back simple: a point of the square at (x, y) is (x, y) / scale(width, height)
    in the original image, and the image fills the square's `content(width, height)` top-left corner. A scene of
    `size` pixels passes unchanged but for the normalisation, which is what training feeds (`normalise`).

    No reduced-size JPEG decoding (draft): the answers are in the original image's pixels."""

    def __init__(self, *, size: int = 160, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 std: tuple[float, ...] = (0.25, 0.25, 0.25)) -> None:
        if size < 16 or size % 16:
            raise ValueError(f"size must be a multiple of 16 (the models' coarsest stride), got {size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std positive; got {mean}, {std}")
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def scale(self, width: int, height: int) -> float:
        return self.size / max(width, height)

    def content(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the image inside the square."""
        scale = self.scale(width, height)
        return max(1, min(self.size, round(width * scale))), max(1, min(self.size, round(height * scale)))

    def from_rgb(self, rgb: Image.Image) -> np.ndarray:
        """An RGB image -> (3, size, size) float32."""
        width, height = self.content(*rgb.size)
        out = np.zeros((3, self.size, self.size), dtype=np.float32)
        out[:, :height, :width] = self._planes(resized(rgb, (width, height)))
        return out


def decode_for(preset: Any, data: bytes, *, max_pixels: int, **limits: Any) -> Image.Image:
    """Decode request bytes the way `preset` wants them (reduced-size JPEG decoding when it allows);
    `limits` go to decode_image (min_side, max_aspect, allow_animated)."""
    return decode_image(data, max_pixels=max_pixels, draft=getattr(preset, "draft_size", None), **limits)


class TensorPreset:
    """Rows that are already the model's input (tabular features): float32, unchanged. A model that needs its
    features scaled scales them itself, inside the exported graph, so a client sends the raw values."""

    def from_array(self, row: np.ndarray) -> np.ndarray:
        return np.asarray(row, dtype=np.float32)


PRESETS: dict[str, Callable[..., Any]] = {"digits": DigitsPreset, "rgb": RGBPreset, "letterbox": LetterboxPreset,
                                          "tensor": TensorPreset}


def build_preset(description: dict[str, Any]) -> Any:
    """{"name": ..., **kwargs} (as stored in registry, checkpoint and manifest) -> a preset instance."""
    kwargs = dict(description)
    name = kwargs.pop("name", None)
    if name not in PRESETS:
        raise ValueError(f"unknown preprocessing preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](**kwargs)
