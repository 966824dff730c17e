"""Send one real sample to the running server and print the answer (`make predict`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import requests

from loadtest.payloads import payloads
from serve_config.control import ServerError, read_keys


def inference_key(run_dir: Path) -> str | None:
    """The running server's inference key from `run_dir`, or None after saying on stderr why there is none."""
    try:
        return read_keys(run_dir)["inference"]
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--run-dir", type=Path, default=Path("run"))
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    args = parser.parse_args(argv)
    token = inference_key(args.run_dir)
    if token is None:
        return 1
    sample = payloads(args.model, 1)[0]
    answer = requests.post(f"{args.url}/predictions/{args.model}", data=sample.body, timeout=30,
                           headers={"Authorization": f"Bearer {token}", "Content-Type": sample.content_type})
    print(f"POST {args.url}/predictions/{args.model}  ({sample.name}, {len(sample.body)} bytes, true label {sample.label})")
    print(f"HTTP {answer.status_code}")
    try:
        print(json.dumps(answer.json(), indent=2))
    except ValueError:
        print(answer.text)
    return 0 if answer.ok else 1


if __name__ == "__main__":
    sys.exit(main())
