"""What a fleet is, as its folder records it: fleet.json (where everything listens, which models, which store),
the clients' token file, and the keys every replica takes."""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.durable import write_atomic
from serve_config.control import KEY_KINDS, Ports, Server, ServerError

STATE = "fleet.json"
# The keys every replica takes (the frontend agent keeps a key file it finds at start-up), so the balancer can
# send them: a replica's ports refuse anyone without them, in every isolation mode.
REPLICA_KEYS = "replica-keys.json"


@dataclass
class Replica:
    name: str
    run_dir: str
    ports: dict
    netns: str | None = None  # its own network namespace (a host of its own), or None: the host's loopback

    @property
    def server(self) -> Server:
        return Server(Path(self.run_dir), Ports(**self.ports), netns=self.netns)


@dataclass
class Fleet:
    root: str
    models: list[str]
    model_store: str
    port: int
    stats_port: int
    token_file: str
    bind: str = "127.0.0.1"
    replicas: list[Replica] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.bind}:{self.port}"

    @property
    def socket(self) -> Path:
        return Path(self.root) / "haproxy.sock"

    def token(self) -> str:
        return Path(self.token_file).read_text().strip()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def save(self) -> None:
        write_atomic(Path(self.root) / STATE, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, root: Path) -> "Fleet":
        path = root / STATE
        if not path.exists():
            raise ServerError(f"{path} does not exist: no fleet was started in {root} (make fleet)")
        data = json.loads(path.read_text())
        return cls(**{**data, "replicas": [Replica(**r) for r in data["replicas"]]})


def ensure_token(path: Path) -> str:
    """The fleet's bearer token from `path`; a new random one (written with mode 600) when there is none."""
    if not path.exists():  # whole or not at all, and never readable by others, not even while it is written
        write_atomic(path, secrets.token_urlsafe(32) + "\n", mode=0o600)
    token = path.read_text().strip()
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ServerError(f"{path}: a token is one word of at least 16 characters")
    return token


def replica_keys(fleet: Fleet) -> dict[str, str]:
    """The replicas' keys (inference, management, api), made once per fleet folder, mode 600."""
    path = Path(fleet.root) / REPLICA_KEYS
    if not path.exists():
        write_atomic(path, json.dumps({kind: secrets.token_urlsafe(32) for kind in KEY_KINDS}),
                     mode=0o600)
    return json.loads(path.read_text())
