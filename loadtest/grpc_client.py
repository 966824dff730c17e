"""Call TorchServe's gRPC inference API (inference.proto: Ping, Predictions) with its own protos.

    python -m loadtest.grpc_client --model digits --file docs/examples/digits/seven.png [--port 7070]
    python -m loadtest.grpc_client --model minilm --text "A sentence to embed."

Nothing is vendored: the .proto files are read from the installed TorchServe's frontend jar
(ts/frontend/model-server.jar) and compiled with grpcio-tools into a folder of their own, once. The key goes
in the `authorization` metadata as `Bearer <key>`, as TorchServe's token authorization expects; without it
TorchServe answers PERMISSION_DENIED.

A gRPC request has no media type: the handler tells an image from text from JSON by the model and by the
bytes themselves. TorchServe 0.12 answers every Predictions call whose batch ran with gRPC status OK and the
handler's body, so a bad request's 4xx arrives as that body (`{"code": 400, ...}`), not as a gRPC status.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import zipfile
from pathlib import Path
from types import ModuleType

from models.paths import ROOT

PROTOS = ("proto/inference.proto", "proto/management.proto", "proto/open_inference_grpc.proto", "google/rpc/status.proto")
OUT = ROOT / "build" / "grpc"


def jar() -> Path:
    import ts

    return Path(ts.__file__).parent / "frontend" / "model-server.jar"


def stubs(out: Path = OUT, proto: str = "inference") -> tuple[ModuleType, ModuleType]:
    """(<proto>_pb2, <proto>_pb2_grpc), compiled from the installed jar's protos into `out` on first use:
    `inference` (TorchServe's own API), `management` (its management API) or `open_inference_grpc` (KServe's
    GRPCInferenceService)."""
    import grpc_tools
    from grpc_tools import protoc

    version = f"{jar().stat().st_size}-{jar().stat().st_mtime_ns}"
    target = out / version
    if not all((target / f"{Path(p).stem}_pb2_grpc.py").exists() for p in PROTOS):
        source = target / "proto-src"
        with zipfile.ZipFile(jar()) as archive:
            for name in PROTOS:
                archive.extract(name, source)
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        code = protoc.main(["protoc", f"-I{source / 'proto'}", f"-I{source}", f"-I{well_known}",
                            f"--python_out={target}", f"--grpc_python_out={target}", *(str(source / p) for p in PROTOS)])
        if code != 0:
            raise RuntimeError(f"protoc failed ({code}) on {PROTOS} from {jar()}")
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    return importlib.import_module(f"{proto}_pb2"), importlib.import_module(f"{proto}_pb2_grpc")


class Client:
    """A channel to one TorchServe's gRPC inference port, with its key."""

    def __init__(self, host: str, port: int, token: str | None, *, max_answer_bytes: int = 8 << 20) -> None:
        """`max_answer_bytes`: the largest answer taken (gRPC's default is 4 MiB; the server sends up to its
        max_response_size, 8 MiB in serve_config/config.properties)."""
        import grpc

        self.pb2, pb2_grpc = stubs()
        # an answer's message holds its body and a little framing
        self.channel = grpc.insecure_channel(f"{host}:{port}",
                                             options=[("grpc.max_receive_message_length", max_answer_bytes + 4096)])
        self.stub = pb2_grpc.InferenceAPIsServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []

    def ping(self, timeout: float = 10.0) -> str:
        from google.protobuf import empty_pb2

        return self.stub.Ping(empty_pb2.Empty(), metadata=self.metadata, timeout=timeout).health

    def predict(self, model: str, data: bytes, *, key: str = "data", timeout: float = 60.0) -> bytes:
        request = self.pb2.PredictionsRequest(model_name=model, input={key: data})
        return self.stub.Predictions(request, metadata=self.metadata, timeout=timeout).prediction

    def stream(self, model: str, data: bytes, *, key: str = "data", timeout: float = 60.0):
        """StreamPredictions: each chunk's bytes as the server sends them (a generator's tokens)."""
        request = self.pb2.PredictionsRequest(model_name=model, input={key: data})
        for answer in self.stub.StreamPredictions(request, metadata=self.metadata, timeout=timeout):
            yield answer.prediction

    def close(self) -> None:
        self.channel.close()


def main(argv: list[str] | None = None) -> int:
    from loadtest.predict import inference_key

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    body = parser.add_mutually_exclusive_group(required=True)
    body.add_argument("--file", type=Path, help="send this file's bytes (an image, or a text or JSON file)")
    body.add_argument("--text", help="send this text")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7070)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "run", help="where `make serve` keeps key_file.json")
    args = parser.parse_args(argv)
    token = inference_key(args.run_dir)
    if token is None:
        return 1
    client = Client(args.host, args.port, token)
    try:
        answer = client.predict(args.model, args.file.read_bytes() if args.file else args.text.encode())
    finally:
        client.close()
    try:
        print(json.dumps(json.loads(answer), indent=2))
    except ValueError:
        print(answer)
    return 1 if b'"code": 4' in answer[:40] else 0


if __name__ == "__main__":
    sys.exit(main())
