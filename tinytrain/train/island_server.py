"""Asynchronous Local SGD's server: the global weights, the outer optimizer, and one session per island.

Islands (each a `tinytrain fit` job of its own, FSDP2 inside) push their pseudo-gradient when their
round ends and get the newest global weights back at once, without waiting for the others (Liu et
al., 2024, "Asynchronous Local-SGD Training for Language Modeling"). The transport is torchft's
``ParameterServer``: an island opens a session over HTTP and gets a two-process gloo group of its own
with the server, so an island that dies ends its session only, and one that comes back opens a new
one. The weights travel as one flat fp32 tensor in the model's parameter order.

The outer step (``OuterUpdates``) is Nesterov SGD at every update, or with ``delayed_nesterov`` N > 1
the paper's delayed Nesterov: each update applies lr x g / N at once, and every N-th update adds the
momentum term lr x mu x m with m <- mu m + (the mean of the last N pseudo-gradients), so N updates
move the weights as one synchronous Nesterov step of their mean would. With ``dynamic_local_updates``
the server gives each island its next round's length in proportion to its measured speed, the
fastest island taking ``inner_steps``, so slow and fast islands end their rounds together.

The server saves its state (weights, momentum, pending sum, counts, each island's speed) to
``<folder>/server.pt`` atomically every ``save_every`` updates and when it stops, and starts from it.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from tinytrain.errors import ConfigError

log = logging.getLogger(__name__)

JOIN, PUSH = 1, 2
HEADER = 8  # int64 values before every exchange


@dataclass(frozen=True)
class OuterSettings:
    """What every island of one asynchronous run must agree on (the server takes the first island's)."""
    outer_lr: float
    outer_momentum: float
    nesterov: bool
    delayed_nesterov: int
    dynamic_local_updates: bool
    inner_steps: int
    islands: int

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.outer_lr, self.outer_momentum, float(self.nesterov), self.delayed_nesterov,
                             float(self.dynamic_local_updates), self.inner_steps, self.islands], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "OuterSettings":
        v = t.tolist()
        return cls(v[0], v[1], bool(v[2]), int(v[3]), bool(v[4]), int(v[5]), int(v[6]))


class OuterUpdates:
    """The global weights (flat fp32) and the outer optimizer that moves them, one update at a time."""

    def __init__(self, weights: torch.Tensor, settings: OuterSettings) -> None:
        self.weights, self.settings = weights, settings
        self.momentum = torch.zeros_like(weights)
        self.pending = torch.zeros_like(weights)  # the pseudo-gradients since the last momentum update
        self.updates = 0

    def apply(self, delta: torch.Tensor) -> None:
        """One island's pseudo-gradient (global weights it started from - its weights now)."""
        s = self.settings
        lr, mu, n = s.outer_lr, s.outer_momentum, s.delayed_nesterov
        self.updates += 1
        if n <= 1:  # Nesterov SGD at every update, as in the synchronous mode (torch.optim's formula)
            from torch.optim.sgd import sgd

            sgd([self.weights], [delta], [self.momentum], weight_decay=0.0, momentum=mu, lr=lr, dampening=0.0,
                nesterov=s.nesterov, maximize=False)
            return
        self.pending.add_(delta)
        self.weights.add_(delta, alpha=-lr / n)
        if self.updates % n == 0:
            self.momentum.mul_(mu).add_(self.pending, alpha=1.0 / n)
            self.pending.zero_()
            self.weights.add_(self.momentum, alpha=-lr * mu)

    def state_dict(self) -> dict:
        return {"weights": self.weights, "momentum": self.momentum, "pending": self.pending, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.weights.copy_(state["weights"])
        self.momentum.copy_(state["momentum"])
        self.pending.copy_(state["pending"])
        self.updates = int(state["updates"])


@dataclass
class IslandRecord:
    """What the server knows of one island: its updates, its last round's speed, the version it holds."""
    updates: int = 0
    steps_per_second: float = 0.0
    version: int = 0
    last_staleness: int = 0
    rounds: list = field(default_factory=list)  # (update, staleness, inner steps) of each push


def round_length(settings: OuterSettings, islands: dict[int, IslandRecord], index: int) -> int:
    """The next round's steps for island ``index``: ``inner_steps``, or with dynamic local updates in
    proportion to its speed against the fastest island's (at least 1)."""
    if not settings.dynamic_local_updates:
        return settings.inner_steps
    speeds = [r.steps_per_second for r in islands.values() if r.steps_per_second > 0]
    own = islands[index].steps_per_second if index in islands else 0.0
    if not speeds or own <= 0:
        return settings.inner_steps
    return max(1, math.floor(settings.inner_steps * own / max(speeds) + 0.5))


class IslandServer:
    """The state behind the sessions, guarded by one lock; ``serve`` starts torchft's HTTP endpoint."""

    def __init__(self, folder: Path, save_every: int = 10) -> None:
        self.folder, self.save_every = Path(folder), save_every
        self.lock = threading.Lock()
        self.outer: Optional[OuterUpdates] = None
        self.islands: dict[int, IslandRecord] = {}
        self.exchanged_bytes = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        self._load()

    # --- state ------------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.folder / "server.pt"

    def _load(self) -> None:
        if not self.path.exists():
            return
        from tinytrain.store import safeload

        state = safeload.torch_load(self.path, map_location="cpu")
        settings = OuterSettings(**state["settings"])
        self.outer = OuterUpdates(state["outer"]["weights"].clone(), settings)
        self.outer.load_state_dict(state["outer"])
        self.islands = {int(k): IslandRecord(**v) for k, v in state["islands"].items()}
        self.exchanged_bytes = int(state.get("exchanged_bytes", 0))
        log.info("island server: resumed from %s at update %d", self.path, self.outer.updates)

    def save(self) -> None:
        """Write the state atomically (a temporary file, then a rename)."""
        from tinytrain.store.fsutil import atomic_write_bytes

        with self.lock:
            if self.outer is None:
                return
            import io

            buffer = io.BytesIO()
            torch.save({"settings": asdict(self.outer.settings), "outer": self.outer.state_dict(),
                        "islands": {k: asdict(v) for k, v in self.islands.items()},
                        "exchanged_bytes": self.exchanged_bytes}, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())

    # --- one exchange -----------------------------------------------------------------------------

    def refusal(self, index: int, settings: OuterSettings, numel: int) -> Optional[str]:
        """Why an island may not take part (None: it may): other settings, another model, a bad index."""
        with self.lock:
            if not 0 <= index < settings.islands:
                return f"island index {index} is outside 0 to {settings.islands - 1}"
            if self.outer is None:
                return None
            if settings != self.outer.settings:
                theirs, ours = asdict(settings), asdict(self.outer.settings)
                diff = ", ".join(f"{k}={theirs[k]} (the run's: {ours[k]})" for k in ours if theirs[k] != ours[k])
                return f"island {index}'s local_sgd settings differ from the run's: {diff}"
            if numel != self.outer.weights.numel():
                return f"island {index}'s model has {numel:,} parameters, the run's {self.outer.weights.numel():,}"
            return None

    def join(self, settings: OuterSettings, weights: Optional[torch.Tensor]) -> tuple[int, int, torch.Tensor]:
        """An island (re)joins: (version, its round length, the global weights). The first island's
        weights start the run when the server has none."""
        with self.lock:
            if self.outer is None:
                if weights is None:
                    raise ValueError("no global weights yet")
                self.outer = OuterUpdates(weights.clone(), settings)
            elif settings != self.outer.settings:
                raise ConfigError(f"local_sgd settings {settings} differ from the run's {self.outer.settings}")
            return self.outer.updates, self.outer.settings.inner_steps, self.outer.weights.clone()

    def push(self, index: int, version: int, steps: int, seconds: float,
             delta: torch.Tensor) -> tuple[int, int, int, torch.Tensor]:
        """Island ``index`` ended a round of ``steps`` steps in ``seconds``, having started from global
        ``version``: apply its pseudo-gradient; (new version, staleness, its next round, weights)."""
        with self.lock:
            outer = self.outer
            staleness = outer.updates - version
            outer.apply(delta)
            record = self.islands.setdefault(index, IslandRecord())
            record.updates += 1
            record.steps_per_second = steps / seconds if seconds > 0 else 0.0
            record.version = outer.updates
            record.last_staleness = staleness
            record.rounds.append((outer.updates, staleness, steps))
            self.exchanged_bytes += 2 * delta.numel() * 4
            result = outer.updates, staleness, round_length(outer.settings, self.islands, index), outer.weights.clone()
            save = outer.updates % self.save_every == 0
        if save:
            self.save()
        return result


def require_torchft() -> None:
    import importlib.util

    if importlib.util.find_spec("torchft") is None:
        raise ConfigError("local_sgd.mode async and tinytrain island-server need torchft: pip install -e \".[islands]\"")


@functools.cache
def _endpoint_class():
    """torchft's ParameterServer over tinytrain's IslandServer: the server side runs one ``_answer`` loop
    per session; its ``new_session`` is the island side's way in."""
    require_torchft()
    from torchft.parameter_server import ParameterServer
    from torchft.process_group import ProcessGroupGloo

    class Endpoint(ParameterServer):
        def __init__(self, server: IslandServer, port: int) -> None:
            self.island_server = server
            super().__init__(port=port)

        @classmethod
        def new_process_group(cls):
            return ProcessGroupGloo(timeout=_TIMEOUT)

        def forward(self, session_id: str, pg) -> None:
            try:
                while True:
                    _answer(self.island_server, pg)
            except Exception as e:  # the island went away (or sent garbage): only its session ends
                log.info("island session %s ended: %s", session_id[:8], str(e).splitlines()[0] if str(e) else e)
            finally:
                pg.abort()

    return Endpoint


def serve(server: IslandServer, port: int):
    """Start torchft's parameter-server endpoint on ``port`` (0: any) for ``server``; returns it (its
    ``address()`` is what islands give as local_sgd.server)."""
    endpoint = _endpoint_class()(server, port)
    # torchft runs a session inside its HTTP request; when the session ends the handler's reply goes to a
    # closed socket, and the HTTP server would print a traceback for what is an island leaving.
    endpoint._server.handle_error = lambda request, client: log.debug("session from %s closed", client)
    return endpoint


_TIMEOUT = __import__("datetime").timedelta(minutes=30)  # a round's compute may take this long between messages


def _answer(server: IslandServer, pg) -> None:
    header = torch.zeros(HEADER, dtype=torch.int64)
    pg.recv([header], 1, 0).wait()
    op, index, version, steps, millis, numel = header[:6].tolist()
    settings_t = torch.zeros(7, dtype=torch.float64)
    pg.recv([settings_t], 1, 1).wait()
    settings = OuterSettings.from_tensor(settings_t)
    if op not in (JOIN, PUSH):
        raise ValueError(f"unknown operation {op}")
    incoming, has = None, server.outer is not None
    if op == JOIN:
        pg.send([torch.tensor([int(has)], dtype=torch.int64)], 1, 2).wait()
    if op == PUSH or not has:  # a pseudo-gradient, or the weights that start the run
        incoming = torch.empty(numel, dtype=torch.float32)
        pg.recv([incoming], 1, 3).wait()
    refusal = server.refusal(index, settings, numel) if op == JOIN or has else \
        "the server holds no global weights (a new state folder?); an island joins a run from its start"
    if refusal is not None:  # said to the island, which stops with it; the run goes on
        message = torch.frombuffer(bytearray(refusal.encode()), dtype=torch.uint8)
        pg.send([torch.tensor([-1, 0, 0, message.numel(), 0, 0, 0, 0], dtype=torch.int64)], 1, 4).wait()
        pg.send([message], 1, 6).wait()
        log.warning("island server: refused island %d: %s", index, refusal)
        return
    if op == JOIN:
        version, length, weights = server.join(settings, incoming)
        staleness = 0
    else:
        version, staleness, length, weights = server.push(index, version, steps, millis / 1000.0, incoming)
    pg.send([torch.tensor([version, staleness, length, 0, 0, 0, 0, 0], dtype=torch.int64)], 1, 4).wait()
    pg.send([weights], 1, 5).wait()


class IslandClient:
    """An island's side of the exchange (rank 0 of the island only)."""

    def __init__(self, address: str, index: int, settings: OuterSettings, connect_seconds: float = 600.0) -> None:
        self.address, self.index, self.settings, self.connect_seconds = address, index, settings, connect_seconds
        self.pg = None

    def _session(self):
        """A session with the server, retried until ``connect_seconds`` have passed."""
        if self.pg is not None:
            return self.pg
        deadline = time.monotonic() + self.connect_seconds
        while True:
            try:
                self.pg = _endpoint_class().new_session(self.address)
                return self.pg
            except OSError as e:
                if time.monotonic() > deadline:
                    from tinytrain.errors import TrainingError

                    raise TrainingError(f"local_sgd.server {self.address}: no answer for {self.connect_seconds:.0f} s "
                                        f"({e})") from None
                time.sleep(1.0)

    def close(self) -> None:
        if self.pg is not None:
            self.pg.abort()
            self.pg = None

    def _send_header(self, pg, op: int, version: int, steps: int, seconds: float, numel: int) -> None:
        header = torch.tensor([op, self.index, version, steps, int(seconds * 1000), numel, 0, 0], dtype=torch.int64)
        pg.send([header], 0, 0).wait()
        pg.send([self.settings.as_tensor()], 0, 1).wait()

    def _retrying(self, exchange):
        """Run ``exchange(pg)``; if the session breaks (the server restarted), open another and redo it."""
        deadline = time.monotonic() + self.connect_seconds
        while True:
            pg = self._session()
            try:
                return exchange(pg)
            except RuntimeError as e:
                self.close()
                if time.monotonic() > deadline:
                    raise
                log.warning("local_sgd: exchange with %s failed (%s); retrying", self.address,
                            str(e).splitlines()[0] if str(e) else e)
                time.sleep(1.0)

    def _reply(self, pg) -> torch.Tensor:
        """The server's answer; its refusal (other settings, another model) raised as a ConfigError."""
        reply = torch.zeros(HEADER, dtype=torch.int64)
        pg.recv([reply], 0, 4).wait()
        if int(reply[0]) < 0:
            message = torch.empty(int(reply[3]), dtype=torch.uint8)
            pg.recv([message], 0, 6).wait()
            raise ConfigError(f"local_sgd.server {self.address} refused this island: "
                              f"{bytes(message.tolist()).decode()}")
        return reply

    def join(self, weights: torch.Tensor) -> tuple[int, int, torch.Tensor]:
        """(version, round length, global weights); ``weights`` start the run if the server has none."""
        def exchange(pg):
            self._send_header(pg, JOIN, 0, 0, 0.0, weights.numel())
            has = torch.zeros(1, dtype=torch.int64)
            pg.recv([has], 0, 2).wait()
            if not int(has[0]):
                pg.send([weights], 0, 3).wait()
            reply = self._reply(pg)
            out = torch.empty_like(weights)
            pg.recv([out], 0, 5).wait()
            return int(reply[0]), int(reply[2]), out

        return self._retrying(exchange)

    def push(self, version: int, steps: int, seconds: float, delta: torch.Tensor) -> tuple[int, int, int, torch.Tensor]:
        """(new version, staleness, next round's length, global weights)."""
        def exchange(pg):
            self._send_header(pg, PUSH, version, steps, seconds, delta.numel())
            pg.send([delta], 0, 3).wait()
            reply = self._reply(pg)
            out = torch.empty_like(delta)
            pg.recv([out], 0, 5).wait()
            return int(reply[0]), int(reply[1]), int(reply[2]), out

        return self._retrying(exchange)
