"""Request payloads as files, the way clients send them.

digits: rendered from the held-out test split in several encodings (PNG, JPEG, BMP), modes (L, RGB,
RGBA, P, I;16) and both polarities. shapes: generated images (a stream never trained on) at photo
sizes up to 1920x1080 in JPEG, PNG and WebP, grayscale, RGBA, palette, CMYK and EXIF-rotated, plus
the two photos scikit-learn ships. cancer: held-out rows of scikit-learn's breast cancer data, each as an Open
Inference Protocol infer request (JSON).

    python -m models.samples --model shapes --out build/samples/shapes --count 20
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


def encode(image: Image.Image, fmt: str = "PNG", *, quality: int = 95, **options) -> bytes:
    """`image` as `fmt` file bytes; `quality` applies to the lossy formats, `options` go to Pillow's save."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}), **options)
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


# (width, height, format, mode): what photo clients send, up to full-HD JPEGs.
SHAPE_VARIANTS = (
    (1920, 1080, "JPEG", "RGB"),
    (640, 480, "JPEG", "RGB"),
    (1280, 720, "JPEG", "RGB"),
    (128, 128, "PNG", "RGB"),
    (1024, 1024, "JPEG", "RGB"),
    (800, 600, "WEBP", "RGB"),
    (512, 512, "PNG", "RGBA"),
    (480, 480, "JPEG", "L"),
    (720, 1280, "JPEG", "EXIF-rotated"),
    (400, 400, "PNG", "P"),
    (600, 600, "JPEG", "CMYK"),
)


def _fit(square: np.ndarray, width: int, height: int) -> Image.Image:
    """Scale a square image to the shorter side and extend its edges to (width, height): a centre crop of
    the result is the original picture, as in a photo whose subject sits in the middle."""
    side = min(width, height)
    big = np.asarray(Image.fromarray(square).resize((side, side), Image.Resampling.BICUBIC))
    pad_x, pad_y = (width - side) // 2, (height - side) // 2
    padded = np.pad(big, ((pad_y, height - side - pad_y), (pad_x, width - side - pad_x), (0, 0)), mode="edge")
    return Image.fromarray(padded)


def _encode_variant(square: np.ndarray, width: int, height: int, fmt: str, mode: str) -> bytes:
    image = _fit(square, width, height)
    if mode == "EXIF-rotated":  # stored turned a quarter, with the EXIF tag that turns it back
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 CW to display
        return encode(image.transpose(Image.Transpose.ROTATE_90), fmt, quality=90, exif=exif.tobytes())
    if mode == "RGBA":
        image = image.convert("RGBA")
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=128)
    elif mode != "RGB":
        image = image.convert(mode)
    return encode(image, fmt, quality=90)


def sklearn_photos() -> list[tuple[bytes, int, str]]:
    """The two photos scikit-learn ships (china.jpg, flower.jpg; 640x427), as JPEG and enlarged to
    1920x1280, labelled -1: real photos of no shape class, for decoding cost and robustness."""
    from sklearn.datasets import load_sample_image

    out = []
    for name in ("china.jpg", "flower.jpg"):
        image = Image.fromarray(load_sample_image(name))
        for width, height in ((image.width, image.height), (1920, 1280)):
            body = encode(image.resize((width, height), Image.Resampling.BICUBIC), "JPEG", quality=90)
            out.append((body, -1, f"photo-{name[:-4]}-{width}x{height}.jpeg"))
    return out


def sample_shapes(count: int, *, seed: int = 0) -> list[tuple[bytes, int, str]]:
    """`count` (bytes, label, filename) triples: generated shapes (their own stream, never trained on)
    at the sizes, formats and modes of SHAPE_VARIANTS, with scikit-learn's photos as every 8th."""
    from models.shapes import CLASSES, generate

    images, labels = generate("samples", count, seed=seed)
    photos = sklearn_photos()
    out = []
    for n in range(count):
        if n % 8 == 7:
            out.append(photos[(n // 8) % len(photos)])
            continue
        width, height, fmt, mode = SHAPE_VARIANTS[n % len(SHAPE_VARIANTS)]
        label = int(labels[n])
        name = f"{n:03d}-{CLASSES[label]}-{width}x{height}-{mode}.{fmt.lower().replace('jpeg', 'jpg')}"
        out.append((_encode_variant(images[n], width, height, fmt, mode), label, name))
    return out


def sample_scenes(count: int, *, seed: int = 0) -> list[tuple[bytes, int, str]]:
    """`count` (bytes, label, filename) triples for the scene models: generated scenes (models/scenes.py, their
    `samples` split) at the sizes, formats and modes of SHAPE_VARIANTS, with scikit-learn's photos as every 8th;
    label -1 (a scene holds several objects)."""
    from models.scenes import generate

    scenes, photos = generate("samples", count, seed=seed), sklearn_photos()
    out = []
    for n, scene in enumerate(scenes):
        if n % 8 == 7:
            out.append(photos[(n // 8) % len(photos)])
            continue
        width, height, fmt, mode = SHAPE_VARIANTS[n % len(SHAPE_VARIANTS)]
        name = f"{n:03d}-scene-{width}x{height}-{mode}.{fmt.lower().replace('jpeg', 'jpg')}"
        out.append((_encode_variant(scene.image, width, height, fmt, mode), -1, name))
    return out


def sample_texts(count: int, *, seed: int = 0) -> list[tuple[bytes, int, str]]:
    """`count` (bytes, label, filename) triples of real text in the length mix of models.text.mixed_texts:
    three in four as text/plain (.txt), one in four as JSON {"text": ...} (.json); label -1 (no class)."""
    import json

    from models.text import mixed_texts

    out = []
    for n, text in enumerate(mixed_texts(count, seed=seed)):
        if n % 4 == 3:
            out.append((json.dumps({"text": text}).encode(), -1, f"{n:03d}-text.json"))
        else:
            out.append((text.encode("utf-8"), -1, f"{n:03d}-text.txt"))
    return out


def sample_cancer(count: int, *, seed: int = 0) -> list[tuple[bytes, int, str]]:
    """`count` (bytes, label, filename) triples: held-out tumours as OIP infer requests of one FP32 row of 30 raw
    measurements (input `features`), labelled with the diagnosis (0 malignant, 1 benign)."""
    import json

    from models.data import load_breast_cancer_split

    split = load_breast_cancer_split(test_only=True)
    picks = np.random.default_rng(seed).choice(len(split.test_labels), size=count,
                                               replace=count > len(split.test_labels))
    out = []
    for n, idx in enumerate(picks):
        row = [float(f"{v:.7g}") for v in split.test_images[idx]]  # the shortest text of each float32
        body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, len(row)], "data": row}]}
        out.append((json.dumps(body).encode(), int(split.test_labels[idx]), f"{n:03d}-tumour{idx}.json"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--count", type=int, default=len(VARIANTS))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from models import registry

    for data, _label, name in registry.resolve(registry.get(args.model).samples)(args.count):
        (args.out / name).write_bytes(data)
    print(f"wrote {args.count} samples to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
