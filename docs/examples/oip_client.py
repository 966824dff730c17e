"""Classify two digits and embed two texts over the Open Inference Protocol, with Triton's HTTP client.

    .venv/bin/python docs/examples/oip_client.py --token "$(make -s token)" [--url 127.0.0.1:8080]

Images go as BYTES rows of raw file bytes in the binary tensor extension (no base64); texts as BYTES rows
of UTF-8. Outputs come back as JSON tensors: label, index and score [n, 5]; embedding [n, 384] and tokens [n].
"""

import argparse
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

EXAMPLES = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8080", help="host:port of TorchServe's inference API")
    parser.add_argument("--token", required=True, help="the inference key (make -s token)")
    args = parser.parse_args()
    client = httpclient.InferenceServerClient(args.url)

    images = np.array([(EXAMPLES / "digits" / name).read_bytes() for name in ("seven.png", "three.png")], dtype=object)
    image = httpclient.InferInput("image", [len(images)], "BYTES")
    image.set_data_from_numpy(images, binary_data=True)
    result = client.infer("digits", [image], headers={"Authorization": f"Bearer {args.token}"})
    labels, scores = result.as_numpy("label"), result.as_numpy("score")
    print("digits:", [(str(label[0]), round(float(score[0]), 4)) for label, score in zip(labels, scores)])

    texts = np.array([b"A sentence to embed.", b"Another, somewhat longer sentence to embed."], dtype=object)
    text = httpclient.InferInput("text", [len(texts)], "BYTES")
    text.set_data_from_numpy(texts, binary_data=False)
    result = client.infer("minilm", [text], headers={"Authorization": f"Bearer {args.token}"})
    print("minilm:", result.as_numpy("embedding").shape, "tokens", result.as_numpy("tokens").tolist())


if __name__ == "__main__":
    main()
