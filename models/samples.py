"""Real digit images as files, the way clients send them: rendered from the held-out test split
in several encodings (PNG, JPEG, BMP), modes (L, RGB, RGBA, P, I;16) and both polarities.

    python -m models.samples --out build/samples/digits --count 20
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

# (mode, polarity, format): the variety a handler must accept.
VARIANTS = (
    ("L", "dark-on-light", "PNG"),
    ("L", "light-on-dark", "PNG"),
    ("RGB", "dark-on-light", "JPEG"),
    ("RGBA", "dark-on-light", "PNG"),
    ("P", "light-on-dark", "PNG"),
    ("I;16", "dark-on-light", "PNG"),
    ("RGB", "light-on-dark", "BMP"),
)


def render(gray: np.ndarray, *, mode: str = "L", polarity: str = "dark-on-light", scale: int = 8) -> Image.Image:
    """(H, W) ink intensities in [0, 1] -> an image `scale` times larger in `mode` and `polarity`."""
    ink = np.asarray(gray, dtype=np.float32)
    values = 1.0 - ink if polarity == "dark-on-light" else ink
    base = Image.fromarray((values * 255).round().astype(np.uint8), mode="L")
    base = base.resize((base.width * scale, base.height * scale), Image.Resampling.NEAREST)
    if mode == "I;16":
        return Image.fromarray((np.asarray(base, dtype=np.uint16) * 257).astype(np.uint16))
    if mode == "RGBA":
        rgba = base.convert("RGBA")
        rgba.putalpha(255)
        return rgba
    if mode == "P":
        return base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return base.convert(mode)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def sample_digits(count: int, *, seed: int = 0) -> list[tuple[bytes, int, str]]:
    """`count` (bytes, label, filename) triples from the test split, cycling through VARIANTS."""
    from models.data import load_digits_split

    split = load_digits_split()
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(split.test_labels), size=count, replace=count > len(split.test_labels))
    out = []
    for n, idx in enumerate(picks):
        mode, polarity, fmt = VARIANTS[n % len(VARIANTS)]
        label = int(split.test_labels[idx])
        name = f"{n:03d}-label{label}-{mode.replace(';', '')}-{polarity}.{fmt.lower()}"
        out.append((encode(render(split.test_images[idx], mode=mode, polarity=polarity), fmt), label, name))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=len(VARIANTS))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for data, _label, name in sample_digits(args.count):
        (args.out / name).write_bytes(data)
    print(f"wrote {args.count} images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
