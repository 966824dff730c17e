"""Streams against a served generator: time to first token and output tokens/s at several numbers of concurrent
streams, measured side by side in one run, and each level's throughput over one stream's.

    python -m loadtest.bench.chat --model chat --streams 1 4 8 16              # `make chat-bench`
    python -m loadtest.bench.chat --model chat --streams 1 4 16 --peer         # `make chat-bench PEER=1`

Each stream asks for `--answer` tokens (ignore_eos, greedy) after a prompt of `--prompt` tokens of real text; every
level sends `rounds` waves of `streams` requests released together. The server is started here on free loopback
ports from the build tree's model store and stopped by its PID.

With `--peer`, three servers are driven the same way through the one OpenAI route all have, POST
/v1/chat/completions with `"stream": true` (Server-Sent Events), one after the other in one run, each alone on the
host: ours; `transformers serve` with its continuous batching; LitServe with its OpenAI spec, generating each request
with transformers as its documentation shows (loadtest.bench.litserve_peer). Both peers serve the same weights (the
checkpoint's GGUF file, dequantised by transformers and saved as a local model folder, since `transformers serve`
reads no architecture from a bare GGUF file), started here on free ports in process groups of their own and stopped
by their PIDs. The peers have no ignore_eos: every answer's length comes from its usage, and tokens/s counts what
each server really produced.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import requests

from loadtest.bench.report import quantile


@dataclass(frozen=True)
class Stream:
    first_token_s: float
    seconds: float
    tokens: int


@dataclass(frozen=True)
class Level:
    streams: int
    results: tuple[Stream, ...]
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.results) / self.wall_s

    def first_token_ms(self, q: float) -> float:
        return quantile([r.first_token_s * 1000 for r in self.results], q)


class ChatWorkload:
    """What one stream asks: a prompt of about `prompt_tokens` tokens of prose, `answer_tokens` tokens back."""

    PROSE = ("The river ran past the old mill, where the miller's daughter kept the accounts and watched the "
             "barges go by with grain for the city. ")

    def __init__(self, prompt_tokens: int = 128, answer_tokens: int = 64) -> None:
        words = (self.PROSE * (prompt_tokens // 20 + 1)).split()
        self.prompt = " ".join(words[:int(prompt_tokens * 0.75)])
        self.answer_tokens = answer_tokens

    def body(self) -> dict:
        return {"prompt": self.prompt, "max_tokens": self.answer_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}


def openai_stream_once(url: str, headers: dict, body: dict) -> Stream:
    """One streamed /v1/completions answer, read as Server-Sent Events; its length from the usage chunk."""
    start = time.perf_counter()
    first, tokens = None, None
    with requests.post(url, json=body, headers=headers, stream=True, timeout=300) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data: "):])
            if "error" in chunk:
                raise RuntimeError(f"{url} answered an error event: {chunk['error']}")
            if first is None and any(c.get("text") or (c.get("delta") or {}).get("content")
                                     for c in chunk.get("choices") or []):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    elapsed = time.perf_counter() - start
    if tokens is None:
        raise RuntimeError(f"{url} sent no usage")
    return Stream(first if first is not None else elapsed, elapsed, tokens)


def stream_once(url: str, headers: dict, body: dict) -> Stream:
    start = time.perf_counter()
    first = None
    last_line = {}
    with requests.post(url, json=body, headers=headers, stream=True, timeout=300) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if not line:
                continue
            last_line = json.loads(line)
            if first is None and last_line.get("text"):
                first = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    return Stream(first if first is not None else elapsed, elapsed, last_line["usage"]["completion_tokens"])


def drive(url: str, headers: dict, workload: ChatWorkload, streams: int, rounds: int, *,
          send: Callable[[str, dict, dict], Stream] = stream_once, body: dict | None = None) -> Level:
    results: list[Stream] = []
    start = time.perf_counter()
    for _ in range(rounds):
        barrier = threading.Barrier(streams)

        def one(_i: int) -> Stream:
            barrier.wait(timeout=60)
            return send(url, headers, body if body is not None else workload.body())

        with ThreadPoolExecutor(streams) as pool:
            results += list(pool.map(one, range(streams)))
    return Level(streams, tuple(results), time.perf_counter() - start)


def hf_folder(checkpoint: Path, out: Path) -> Path:
    """The checkpoint's GGUF weights as a transformers model folder (fp32 safetensors, the tokenizer and the chat
    template), made once per GGUF file."""
    from models.chat import weights_file

    gguf = weights_file(checkpoint)
    stamp = out / "source.json"
    source = {"gguf": str(gguf), "size": gguf.stat().st_size, "mtime": gguf.stat().st_mtime}
    if stamp.exists() and json.loads(stamp.read_text()) == source:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(checkpoint, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, gguf_file=gguf.name)
    tokenizer.chat_template = json.loads((checkpoint / "chat.json").read_text())["template"]
    config = quantized.config
    if hasattr(config, "quantization_config"):  # the weights are dequantised: saved as plain fp32
        delattr(config, "quantization_config")
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stamp.write_text(json.dumps(source))
    return out


@contextmanager
def peer_process(name: str, command: list[str], folder: Path, health: str) -> Iterator[str]:
    """A peer server started by `command` on a free loopback port (`{port}` in it), in a process group of its own:
    its base URL once `health` answers 200; stopped by its PID."""
    import os
    import subprocess

    from serve_config.control import end_group
    from serve_config.fleet import free_port

    port = free_port()
    log_path = folder / f"{name}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([part.replace("{port}", str(port)) for part in command], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log_path}")
            try:
                if requests.get(f"{url}{health}", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer {health} in 300 s; see {log_path}")
            time.sleep(1)
        yield url
    finally:
        end_group(proc.pid, timeout=30)  # its own process group, by its PID
        proc.wait()
        log.close()


def transformers_serve(folder: Path):
    """`transformers serve` with its continuous batching, on the CPU."""
    import sys

    return peer_process("transformers-serve", [str(Path(sys.executable).with_name("transformers")), "serve",
                                               str(folder), "--continuous-batching", "--device", "cpu", "--host",
                                               "127.0.0.1", "--port", "{port}", "--format", "quiet"], folder, "/health")


def litserve(folder: Path):
    """LitServe with its OpenAI spec (loadtest.bench.litserve_peer)."""
    import sys

    return peer_process("litserve", [sys.executable, "-m", "loadtest.bench.litserve_peer", "--folder", str(folder),
                                     "--port", "{port}"], folder, "/health")


def report(title: str, levels: list[Level]) -> None:
    base = levels[0].tokens_per_s
    print(title)
    print(f"{'streams':>8} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'tokens/s':>9} {'x one stream':>13} "
          f"{'tokens/answer':>14}")
    for level in levels:
        print(f"{level.streams:>8} {level.first_token_ms(0.5):>12.0f} {level.first_token_ms(0.99):>12.0f} "
              f"{level.tokens_per_s:>9.1f} {level.tokens_per_s / base:>13.2f} "
              f"{statistics.mean(r.tokens for r in level.results):>14.1f}")


def compare_with_peers(args, workload: ChatWorkload) -> int:
    """Ours, `transformers serve` and LitServe, each alone on the host, through POST /v1/chat/completions (the one
    route all three have) with the same bodies."""
    from models import paths
    from serve_config.control import Ports, start, stop

    tree = paths.current()
    body = {"messages": [{"role": "user", "content": workload.prompt}], "max_tokens": workload.answer_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    run_dir = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    server = start(run_dir, [args.model], ports=Ports.free(), model_store=tree.model_store)
    try:
        url = f"{server.inference_url}/v1/chat/completions"
        ours_body = {**body, "model": args.model}
        openai_stream_once(url, server.headers(), ours_body)  # warm
        levels = {"ours": [drive(url, server.headers(), workload, n, args.rounds, send=openai_stream_once,
                                 body=ours_body) for n in args.streams]}
    finally:
        stop(run_dir)
    folder = hf_folder(tree.checkpoint(args.model), paths.ROOT / "build" / "peers" / f"{args.model}-hf")
    for name, peer in (("transformers serve", transformers_serve), ("LitServe", litserve)):
        with peer(folder) as base:
            url, peer_body = f"{base}/v1/chat/completions", {**body, "model": str(folder)}
            openai_stream_once(url, {}, peer_body)  # loads and warms the model
            levels[name] = [drive(url, {}, workload, n, args.rounds, send=openai_stream_once, body=peer_body)
                            for n in args.streams]
    print(f"{args.model}: {args.prompt}-token prompts, at most {args.answer}-token answers (greedy, no ignore_eos), "
          f"{args.rounds} waves per level, POST /v1/chat/completions streamed")
    report("ours (TorchServe, the generate kind):", levels["ours"])
    report("transformers serve --continuous-batching (the same weights, fp32):", levels["transformers serve"])
    report("LitServe, OpenAI spec, transformers generate per request (the same weights, fp32):", levels["LitServe"])
    print(f"{'streams':>8} {'peer':>19} {'tokens/s ours/peer':>19} {'TTFT p50 peer/ours':>19}")
    for name in ("transformers serve", "LitServe"):
        for a, b in zip(levels["ours"], levels[name], strict=True):
            print(f"{a.streams:>8} {name:>19} {a.tokens_per_s / b.tokens_per_s:>19.2f} "
                  f"{b.first_token_ms(0.5) / a.first_token_ms(0.5):>19.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from models import paths
    from serve_config.control import Ports, start, stop

    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="chat")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--answer", type=int, default=64)
    parser.add_argument("--peer", action="store_true",
                        help="also drive `transformers serve` and LitServe on the same weights")
    args = parser.parse_args(argv)
    workload = ChatWorkload(args.prompt, args.answer)
    if args.peer:
        return compare_with_peers(args, workload)
    run_dir = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    server = start(run_dir, [args.model], ports=Ports.free(), model_store=paths.current().model_store)
    try:
        url = f"{server.inference_url}/predictions/{args.model}"
        stream_once(url, server.headers(), workload.body())  # warm
        levels = [drive(url, server.headers(), workload, n, args.rounds) for n in args.streams]
    finally:
        stop(run_dir)
    report(f"{args.model}: {args.prompt}-token prompts, {args.answer}-token answers, {args.rounds} waves per level",
           levels)
    print(f"mean stream time at {levels[-1].streams}: {statistics.mean(r.seconds for r in levels[-1].results):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
