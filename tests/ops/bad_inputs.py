"""The bad-request matrices, one per model kind: (name, body, headers, expected status, expected type).

A `type` of None means the answer comes from TorchServe's frontend, not the handler: its 404 for an unknown
model is JSON in its own words; its 413 past `max_request_size` has an empty body (netty's aggregator answers
before any TorchServe code runs), so only the status is checked there. Every body is built here, offline.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

from PIL import Image

IMAGE = {"Content-Type": "image/png"}
JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}


def png(width: int, height: int, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and whose data is a few bytes: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def gif_header(width: int, height: int) -> bytes:
    """A GIF whose screen and image descriptors declare width x height around a 1-pixel LZW stream."""
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
            + b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00;")


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def jpeg(width: int = 96, height: int = 96) -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((width, height)).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def corrupted_jpeg() -> bytes:
    """A JPEG whose quantisation and Huffman tables are overwritten with garbage past its SOI marker."""
    data = bytearray(jpeg())
    data[4:400] = bytes((i * 37 + 11) % 256 for i in range(396))
    return bytes(data)


def image_matrix(max_image_bytes: int, max_request_size: int) -> list[tuple[str, bytes, dict, int, str | None]]:
    good = png(64, 64)
    return [
        ("empty body", b"", IMAGE, 400, "EmptyRequest"),
        ("truncated PNG", good[: len(good) // 2], IMAGE, 400, "InvalidImage"),
        ("PNG cut after its header", good[:40], IMAGE, 400, "InvalidImage"),
        ("corrupted JPEG", corrupted_jpeg(), {"Content-Type": "image/jpeg"}, 400, "InvalidImage"),
        ("a text file sent as an image", b"just some text\nnot an image\n", IMAGE, 400, "InvalidImage"),
        ("a PDF sent as an image", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", {"Content-Type": "application/octet-stream"},
         400, "InvalidImage"),
        ("PNG bomb: 100000x100000 declared", png_header(100_000, 100_000), IMAGE, 413, "ImageTooLarge"),
        ("GIF bomb: 65535x65535 declared", gif_header(65535, 65535), {"Content-Type": "image/gif"}, 413, "ImageTooLarge"),
        ("PNG declaring 0x0", png_header(0, 0), IMAGE, 400, "InvalidImage"),
        ("1x1 image", png(1, 1), IMAGE, 400, "InvalidImage"),
        ("4000x10 strip (aspect 400:1)", png(4000, 10), IMAGE, 400, "InvalidImage"),
        ("animated GIF", animated("GIF"), {"Content-Type": "image/gif"}, 400, "InvalidImage"),
        ("animated WebP", animated("WEBP"), {"Content-Type": "image/webp"}, 400, "InvalidImage"),
        ("JSON: image is a number", b'{"image": 5}', JSON, 400, "InvalidJSON"),
        ("JSON: image is NaN", b'{"image": NaN}', JSON, 400, "InvalidJSON"),
        ("JSON: image is Infinity", b'{"image": -Infinity}', JSON, 400, "InvalidJSON"),
        ("JSON: a list, not an object", b"[1, 2, 3]", JSON, 400, "InvalidJSON"),
        ("JSON: no image field", b'{"picture": "aGk="}', JSON, 400, "InvalidJSON"),
        ("JSON: invalid base64", b'{"image": "@@not base64@@"}', JSON, 400, "InvalidBase64"),
        ("JSON: base64 of text", json.dumps({"image": base64.b64encode(b"hello").decode()}).encode(), JSON, 400,
         "InvalidImage"),
        ("JSON that does not parse", b'{"image": ', JSON, 400, "InvalidJSON"),
        ("JSON with invalid UTF-8", b'{"image": "\xff\xfe"}', JSON, 400, "InvalidJSON"),
        ("a text/plain body", b"hello", TEXT, 400, "UnsupportedInput"),
        ("form-urlencoded body (curl's default)", good, {"Content-Type": "application/x-www-form-urlencoded"}, 415,
         "UnsupportedMediaType"),
        ("one byte over max_image_bytes", b"\x89PNG" + b"\x00" * (max_image_bytes - 3), IMAGE, 413, "PayloadTooLarge"),
        ("over the server's max_request_size", b"\x00" * (max_request_size + 1), IMAGE, 413, None),
    ]


def text_matrix(max_texts: int, max_chars: int, max_request_size: int) -> list[tuple[str, bytes, dict, int, str | None]]:
    return [
        ("empty body", b"", TEXT, 400, "EmptyRequest"),
        ("blank text", b" \n\t ", TEXT, 400, "EmptyText"),
        ("invalid UTF-8", b"\xff\xfe\xfa", TEXT, 400, "InvalidUTF8"),
        ("Latin-1 bytes", "café crème".encode("latin-1"), TEXT, 400, "InvalidUTF8"),
        ("UTF-8 cut mid-character", "price: 5 €".encode()[:-1], TEXT, 400, "InvalidUTF8"),
        ("JSON with invalid UTF-8", b'{"text": "\xc3\x28"}', JSON, 400, "InvalidUTF8"),
        ("JSON that does not parse", b'{"text": ', JSON, 400, "InvalidJSON"),
        ("JSON: a list", b'["a", "b"]', JSON, 400, "InvalidJSON"),
        ("JSON: a bare string", b'"just a string"', JSON, 400, "InvalidJSON"),
        ("JSON: empty object", b"{}", JSON, 400, "InvalidJSON"),
        ("JSON: both text and texts", b'{"text": "a", "texts": ["b"]}', JSON, 400, "InvalidJSON"),
        ("JSON: text is a number", b'{"text": 5}', JSON, 400, "InvalidText"),
        ("JSON: text is NaN", b'{"text": NaN}', JSON, 400, "InvalidText"),
        ("JSON: text is Infinity", b'{"text": Infinity}', JSON, 400, "InvalidText"),
        ("JSON: text is null", b'{"text": null}', JSON, 400, "InvalidText"),
        ("JSON: text is a list", b'{"text": ["a"]}', JSON, 400, "InvalidText"),
        ("JSON: text is empty", b'{"text": ""}', JSON, 400, "EmptyText"),
        ("JSON: texts is a string", b'{"texts": "abc"}', JSON, 400, "InvalidJSON"),
        ("JSON: texts is empty", b'{"texts": []}', JSON, 400, "EmptyText"),
        ("JSON: texts holds a number", b'{"texts": ["a", 1]}', JSON, 400, "InvalidText"),
        ("JSON: texts holds NaN", b'{"texts": ["a", NaN]}', JSON, 400, "InvalidText"),
        ("JSON: texts holds a blank", b'{"texts": ["a", "   "]}', JSON, 400, "EmptyText"),
        ("JSON: one text over the limit", json.dumps({"texts": ["t"] * (max_texts + 1)}).encode(), JSON, 413,
         "TooManyTexts"),
        ("JSON: a text over max_text_chars", json.dumps({"text": "x" * (max_chars + 1)}).encode(), JSON, 413,
         "TextTooLong"),
        ("text/plain over max_text_chars", b"y" * (max_chars + 1), TEXT, 413, "TextTooLong"),
        ("an image sent to a text model", png(16, 16), IMAGE, 415, "UnsupportedMediaType"),
        ("application/octet-stream", b"some bytes", {"Content-Type": "application/octet-stream"}, 415,
         "UnsupportedMediaType"),
        ("form-urlencoded body", b"text=hello", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
         "UnsupportedMediaType"),
        ("over the server's max_request_size", b"z" * (max_request_size + 1), TEXT, 413, None),
    ]
