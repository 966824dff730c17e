"""The one preprocessing module: training, evaluation, export verification and the handlers import it.

Two layers:
- decoding: request bytes -> a PIL image, with byte and pixel limits checked *before* pixels are
  decoded (Pillow's own decompression-bomb guard stays on; nothing here changes process-wide state);
- presets: small callables with keyword-only settings that turn a decoded image (or, for training
  data that is already an array, the array) into the exact tensor the model was trained on.

A preset is described by a JSON-able dict ({"name": "digits", "size": 32, ...}) that is stored in
the checkpoint and the export manifest, so the server rebuilds the same preset the model saw.
"""

from __future__ import annotations

import io
import warnings
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError


class InvalidImage(ValueError):
    """The bytes are not an image this service can decode."""


class ImageTooLarge(InvalidImage):
    """The image declares more pixels than the model's configured limit."""


# Modes whose pixel values are wider than 8 bits; scaled to [0, 1] by their full range.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode `data` into a loaded PIL image, refusing anything over `max_pixels` before decoding it.

    Raises InvalidImage for empty, truncated, corrupt or non-image bytes and ImageTooLarge for images
    whose header declares more than `max_pixels` pixels (a decompression bomb is refused from its header).
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
            image.load()
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(f"the image is too large to decode safely: {err}") from None
    except UnidentifiedImageError:
        raise InvalidImage("the bytes are not a recognised image format (PNG, JPEG, GIF, BMP, WebP, TIFF, ...)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
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


def to_gray_array(image: Image.Image) -> np.ndarray:
    """Any PIL image -> (H, W) float32 in [0, 1], with EXIF rotation applied.

    Transparent images are composited onto white first (a transparent canvas reads as paper);
    16-bit and 32-bit grayscale is scaled by its full range rather than clipped at 255.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_MODES:
        array = np.asarray(image, dtype=np.float32)
        return np.clip(array / _full_range(image.mode, float(array.max(initial=0.0))), 0.0, 1.0)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


class DigitsPreset:
    """Grayscale digit -> (1, size, size) tensor normalised like the training data.

    The training data (scikit-learn's digits) is white ink on black. People draw dark ink on light
    paper. The preset makes both look alike:
    1. polarity: the background is the median of the border pixels; a light background is inverted,
       so ink is always bright;
    2. contrast: the background level maps to 0 and the brightest ink to 1 (grey paper, faint pens);
    3. framing: the ink's bounding box (pixels above `ink_threshold`) is centred on a square canvas
       with `margin` of its side on every edge, so a small digit in a big canvas fills the frame as
       the training digits do;
    4. resize to `size` x `size` (bilinear, antialiased), then (x - mean) / std.
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

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """A decoded image of any mode and size -> (1, size, size) float32."""
        return self.from_array(to_gray_array(image))

    def from_array(self, gray: np.ndarray) -> torch.Tensor:
        """(H, W) intensities in [0, 1], either polarity -> (1, size, size) float32."""
        x = torch.as_tensor(np.ascontiguousarray(gray, dtype=np.float32))  # (H, W)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D grayscale array, got shape {tuple(x.shape)}")
        border = torch.cat([x[0], x[-1], x[:, 0], x[:, -1]])
        background = border.median()
        if background > 0.5:
            x, background = 1.0 - x, 1.0 - background
        peak = x.max()
        if peak - background <= 1e-6:
            x = torch.zeros_like(x)
        else:
            x = ((x - background) / (peak - background)).clamp_(0.0, 1.0)
        x = self._frame(x)
        x = F.interpolate(x[None, None], size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return ((x[0] - self.mean) / self.std).contiguous()  # (1, size, size)

    def _frame(self, x: torch.Tensor) -> torch.Tensor:
        """Crop to the ink's bounding box and centre it on a square canvas with a margin."""
        rows = torch.nonzero((x > self.ink_threshold).any(dim=1)).flatten()
        cols = torch.nonzero((x > self.ink_threshold).any(dim=0)).flatten()
        if rows.numel():
            x = x[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        height, width = x.shape
        side = max(height, width)
        pad = int(round(side * self.margin))
        canvas = x.new_zeros((side + 2 * pad, side + 2 * pad))
        top, left = pad + (side - height) // 2, pad + (side - width) // 2
        canvas[top : top + height, left : left + width] = x
        return canvas

    def describe(self) -> dict[str, Any]:
        return {
            "name": "digits",
            "size": self.size,
            "margin": self.margin,
            "mean": self.mean,
            "std": self.std,
            "ink_threshold": self.ink_threshold,
        }


PRESETS: dict[str, Callable[..., Any]] = {"digits": DigitsPreset}


def build_preset(description: dict[str, Any]) -> Any:
    """{"name": ..., **kwargs} (as stored in registry, checkpoint and manifest) -> a preset instance."""
    kwargs = dict(description)
    name = kwargs.pop("name", None)
    if name not in PRESETS:
        raise ValueError(f"unknown preprocessing preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](**kwargs)
