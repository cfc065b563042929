"""`tinytrain island-server`: the global weights and outer optimizer of asynchronous Local SGD
(`local_sgd.mode async`), serving any number of island jobs until stopped (SIGTERM or Ctrl-C)."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("tinytrain")


def main(argv: list[str]) -> None:
    from tinytrain.errors import argument_parser

    parser = argument_parser(prog="tinytrain island-server",
                             description="Serve asynchronous Local SGD's global weights to island jobs "
                                         "(fit --local_sgd.mode async --local_sgd.server ADDRESS).")
    parser.add_argument("folder", help="where the server keeps its state (server.pt); an existing state resumes")
    parser.add_argument("--port", type=int, default=29610, help="HTTP port islands open sessions on (0: any free)")
    parser.add_argument("--save_every", type=int, default=10, help="save the state every this many updates")
    parser.add_argument("--address_file", help="also write the address islands need to this file")
    args = parser.parse_args(argv)
    if args.save_every < 1:
        parser.error(f"--save_every must be >= 1, got {args.save_every}")

    from tinytrain.train.island_server import IslandServer, serve

    server = IslandServer(args.folder, args.save_every)
    endpoint = serve(server, args.port)
    address = endpoint.address()
    if args.address_file:
        from pathlib import Path

        from tinytrain.store.fsutil import atomic_write_bytes

        atomic_write_bytes(Path(args.address_file), (address + "\n").encode())
    print(f"island server at {address} (state in {args.folder})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.save()
    log.info("island server: stopped at update %d; state in %s", server.outer.updates if server.outer else 0,
             server.path)
