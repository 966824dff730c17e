"""The bad-request matrices, one per model kind: (name, body, headers, expected status, expected type).

A `type` of None means the answer comes from TorchServe's frontend, not the handler: its 404 for an unknown
model is JSON in its own words; its 413 past `max_request_size` has an empty body (netty's aggregator answers
before any TorchServe code runs), so only the status is checked there. Every body is built here, offline.
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
import zlib

from PIL import Image

IMAGE = {"Content-Type": "image/png"}
JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}


def png(width: int, height: int, color=(200, 30, 30), mode: str = "RGB") -> bytes:
    """A PNG of one colour: a few KB even when it decodes to millions of pixels (mode L is the smallest)."""
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, "PNG")
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


def hostile_json(field: str) -> list[tuple[str, bytes, dict, int, str]]:
    """Bodies that Python's JSON parser takes badly rather than refuses: nesting deeper than it recurses, and a
    number with more digits than Python converts. TorchServe's worker fails to parse them too and forwards the
    raw bytes; the handler must answer 400, never 500."""
    return [
        ("JSON nested 100,000 deep", ("[" * 100_000 + "]" * 100_000).encode(), JSON, 400, "InvalidJSON"),
        (f"JSON: {field} nested 100,000 deep", f'{{"{field}": {"[" * 100_000}{"]" * 100_000}}}'.encode(), JSON, 400,
         "InvalidJSON"),
        ("JSON: an integer of 5,000 digits", f'{{"{field}": {"7" * 5000}}}'.encode(), JSON, 400, "InvalidJSON"),
    ]


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
        *hostile_json("image"),
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
        *hostile_json("text"),
        ("JSON: a lone surrogate escape", b'{"text": "broken \\ud800 pair"}', JSON, 400, "InvalidText"),
        ("JSON: texts holds a lone low surrogate", b'{"texts": ["fine", "\\udfff"]}', JSON, 400, "InvalidText"),
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


def _infer(inputs, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def oip_matrix(image_model: bool, input_shape: tuple[int, ...], max_rows: int,
               handler: dict | None = None) -> list[tuple[str, bytes, dict, int]]:
    """Bad Open Inference Protocol infer requests for /v2/models/<model>/infer: (name, body, headers, status).
    Each must be answered with its status and the protocol's `{"error": "..."}` body. `handler`: an image
    model's handler settings, for its pixel budgets."""
    good = base64.b64encode(png(64, 64)).decode() if image_model else "a fine sentence"
    name = "image" if image_model else "text"
    cases = [
        ("no inputs", _infer([]), JSON, 400),
        ("inputs is not a list", _infer({"name": name}), JSON, 400),
        ("an input without a name", _infer([{"shape": [1], "datatype": "BYTES", "data": [good]}]), JSON, 400),
        ("unknown datatype", _infer([{"name": name, "shape": [1], "datatype": "STRING", "data": [good]}]), JSON, 400),
        ("wrong datatype for the model", _infer([{"name": name, "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]}]),
         JSON, 400),
        ("shape holds more than data", _infer([{"name": name, "shape": [2], "datatype": "BYTES", "data": [good]}]), JSON, 400),
        ("data holds more than shape", _infer([{"name": name, "shape": [1], "datatype": "BYTES", "data": [good, good]}]),
         JSON, 400),
        ("negative shape", _infer([{"name": name, "shape": [-1], "datatype": "BYTES", "data": [good]}]), JSON, 400),
        ("numbers in BYTES", _infer([{"name": name, "shape": [1], "datatype": "BYTES", "data": [7]}]), JSON, 400),
        ("two inputs", _infer([{"name": name, "shape": [1], "datatype": "BYTES", "data": [good]},
                               {"name": "other", "shape": [1], "datatype": "BYTES", "data": [good]}]), JSON, 400),
        ("unknown output name", _infer([{"name": name, "shape": [1], "datatype": "BYTES", "data": [good]}],
                                       outputs=[{"name": "nope"}]), JSON, 400),
        ("id that is not a string", _infer([{"name": name, "shape": [1], "datatype": "BYTES", "data": [good]}], id=5),
         JSON, 400),
        ("too many rows", _infer([{"name": name, "shape": [max_rows + 1], "datatype": "BYTES",
                                   "data": [good] * (max_rows + 1)}]), JSON, 413),
        ("binary header length past the body", _infer([{"name": name, "shape": [1], "datatype": "BYTES",
                                                        "parameters": {"binary_data_size": 10}}]),
         {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "100000"}, 400),
        ("binary data size past the body", _infer([{"name": name, "shape": [1], "datatype": "BYTES",
                                                    "parameters": {"binary_data_size": 64}}]) + b"\x02\x00\x00\x00ab",
         {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(_infer(
             [{"name": name, "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 64}}])))}, 400),
    ]
    if image_model:
        cases += [
            ("bad base64", _infer([{"name": name, "shape": [1], "datatype": "BYTES", "data": ["@@not base64@@"]}]), JSON, 400),
            ("base64 of text", _infer([{"name": name, "shape": [1], "datatype": "BYTES",
                                        "data": [base64.b64encode(b"hello").decode()]}]), JSON, 400),
            ("UINT8 out of range", _infer([{"name": name, "shape": [1, 8, 8, 1], "datatype": "UINT8",
                                            "data": [300] * 64}]), JSON, 400),
            ("UINT8 with 2 channels", _infer([{"name": name, "shape": [1, 8, 8, 2], "datatype": "UINT8",
                                               "data": [0] * 128}]), JSON, 400),
            ("UINT8 image too small", _infer([{"name": name, "shape": [1, 2, 2, 3], "datatype": "UINT8",
                                               "data": [0] * 12}]), JSON, 400),
            ("FP32 of the wrong layout", _infer([{"name": name, "shape": [1, 2, 2], "datatype": "FP32",
                                                  "data": [0.0] * 4}]), JSON, 400),
            ("FP32 with NaN", _infer([{"name": name, "shape": [1, *input_shape], "datatype": "FP32",
                                       "data": [float("nan")] + [0.0] * (math.prod(input_shape) - 1)}]), JSON, 400),
        ]
        if handler is not None:
            # as many of the largest images the model takes as a request may hold: a few MB that decode to a
            # minute of work without a budget (TorchServe's responseTimeout then killed the worker and its batch)
            side = math.isqrt(handler["max_image_pixels"])
            assert max_rows * side * side > handler["max_pixels_per_request"]
            big = base64.b64encode(png(side, side, 200, mode="L")).decode()
            cases.append(("images past the request's pixel budget",
                          _infer([{"name": name, "shape": [max_rows], "datatype": "BYTES", "data": [big] * max_rows}]),
                          JSON, 413))
    else:
        cases += [
            ("an empty text", _infer([{"name": name, "shape": [1], "datatype": "BYTES", "data": ["  "]}]), JSON, 400),
            ("binary text that is not UTF-8", _infer([{"name": name, "shape": [1], "datatype": "BYTES",
                                                       "parameters": {"binary_data_size": 7}}]) + b"\x03\x00\x00\x00\xff\xfe\xfa",
             {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(_infer(
                 [{"name": name, "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 7}}])))}, 400),
        ]
    return cases
