"""One validation pass: each batch's loss kept on the device, then everything logged once at the end.

Logged: the loss and perplexity; bits per byte (the loss over the UTF-8 bytes the targets stand for,
so tokenizers compare); with a mixture, each source's loss and bits per byte; with
``loss_by_position``, the loss in equal spans of positions. Every rank reads the same number of
equal-length batches, so means of means are exact and the values are identical on every rank.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from tinytrain.train.metrics import VAL_BPB, VAL_LOSS, VAL_PPL


def token_bytes(tokenizer_path, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes per token id, padded to the model's vocabulary so that any target id indexes it
    (no host check per batch; the data's ids are the tokenizer's, checked at start-up)."""
    from tinytrain.data.tokenizer import Tokenizer, byte_lengths

    table = byte_lengths(Tokenizer(tokenizer_path))
    return torch.cat([table, table.new_zeros(max(vocab_size, table.numel()) - table.numel())])


class ValidationPass:
    def __init__(self, token_bytes: Optional[torch.Tensor], loss_by_position: int = 0) -> None:
        self.token_bytes, self.spans = token_bytes, loss_by_position
        self.losses: dict[int, list[torch.Tensor]] = {}  # per source (dataloader)
        self.nats_bytes: dict[int, torch.Tensor] = {}  # per source: summed nats, summed target bytes
        self.by_position: dict[tuple[int, int], list[torch.Tensor]] = {}  # (first, last) position -> losses

    def add(self, model, batch: torch.Tensor, source: int) -> None:
        """One batch (B, seq_len + 1) of token ids from source ``source``."""
        batch = batch.long()
        targets = batch[:, 1:]
        if self.spans:
            per_token = model(batch[:, :-1], targets, per_token=True)  # (B, T)
            loss = per_token.mean()
            edges = torch.linspace(0, per_token.size(1), self.spans + 1).round().long().tolist()
            for a, b in zip(edges, edges[1:]):
                self.by_position.setdefault((a, b - 1), []).append(per_token[:, a:b].mean())
        else:
            loss = model(batch[:, :-1], targets).detach()
        self.losses.setdefault(source, []).append(loss)
        if self.token_bytes is not None:
            sums = torch.stack([loss.double() * targets.numel(), self.token_bytes[targets].sum().double()])
            self.nats_bytes[source] = self.nats_bytes.get(source, 0) + sums

    def log(self, module, source_names: list[str]) -> None:
        """Log the pass's metrics through the LightningModule ``module`` (sync_dist only tells
        Lightning the values agree across ranks)."""
        if not self.losses:
            return
        reduce = module.trainer.strategy.reduce
        loss = reduce(torch.cat([torch.stack(v) for v in self.losses.values()]).mean(), reduce_op="mean")
        module.log(VAL_LOSS, loss, prog_bar=True, sync_dist=True)
        module.log(VAL_PPL, torch.exp(loss), sync_dist=True)
        nats_bytes = {i: reduce(v, reduce_op="sum") for i, v in self.nats_bytes.items()}
        if nats_bytes:
            total = sum(nats_bytes.values())
            module.log(VAL_BPB, float(total[0] / total[1] / math.log(2)), sync_dist=True)
        width = len(str(max((last for _, last in self.by_position), default=0)))
        for (first, last), losses in sorted(self.by_position.items()):
            module.log(f"val/loss_by_position/{first:0{width}d}-{last:0{width}d}",
                       reduce(torch.stack(losses).mean(), reduce_op="mean"), sync_dist=True)
        if len(self.losses) > 1 and len(source_names) == len(self.losses):
            for idx, losses in sorted(self.losses.items()):
                module.log(f"val/loss/{source_names[idx]}", reduce(torch.stack(losses).mean(), reduce_op="mean"),
                           sync_dist=True)
                if idx in nats_bytes:
                    module.log(f"val/bpb/{source_names[idx]}",
                               float(nats_bytes[idx][0] / nats_bytes[idx][1] / math.log(2)), sync_dist=True)
