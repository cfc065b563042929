"""The progress bar of `tinytrain prepare`: input bytes (so it has an ETA), documents, tokens, tokens/s."""

from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    """A progress bar over input bytes (so it has an ETA) with documents, tokens and tokens/s."""

    def __init__(self, queue=None, enabled: bool = True) -> None:
        self.queue, self.enabled, self.bar = queue, enabled, None

    def start(self, name: str, total_bytes: Optional[int]) -> None:
        from tqdm import tqdm

        self.docs = self.tokens = 0
        self.finished: set[int] = set()  # units whose last report has arrived
        self.t0 = time.monotonic()
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=name, disable=not self.enabled,
                        file=sys.stderr, dynamic_ncols=True)

    def update(self, nbytes: int, docs: int, tokens: int, last_of: Optional[int] = None) -> None:
        if last_of is not None:
            self.finished.add(last_of)
        self.docs += docs
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(nbytes)
            rate = self.tokens / max(1e-9, time.monotonic() - self.t0)
            self.bar.set_postfix_str(f"{self.docs:,} docs, {self.tokens:,} tokens, {rate:,.0f} tok/s", refresh=False)

    def drain(self, units: Optional[set[int]] = None) -> None:
        """Count what the workers have reported; with ``units``, wait (up to 30 s) for the last report of
        each, so the bar closes on the true totals."""
        if self.queue is None:
            return
        import queue as queue_mod

        deadline = time.monotonic() + 30
        while True:
            waiting = units is not None and not units <= self.finished and time.monotonic() < deadline
            try:
                self.update(*(self.queue.get(timeout=0.1) if waiting else self.queue.get_nowait()))
            except queue_mod.Empty:
                if not waiting:
                    return

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
