"""tinytrain's model class for EleutherAI's lm-evaluation-harness (imported only with `lm-eval`).

It encodes requests as the harness's Hugging Face class does on a Llama folder (BOS in front, the
context's trailing spaces moved to the continuation), so a checkpoint and its `convert to-hf`
export score the same; requests are batched by length, longest first, and generation uses the KV
cache. With several processes (FSDP2) each rank runs its share of the requests, and every rank
runs the same number of forward passes, as FSDP2's collectives require.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from tinytrain.data.tokenizer import Tokenizer
from tinytrain.model.llama import Llama
from tinytrain.model.sampling import sample_next


class TinyTrainLM(TemplateLM):
    backend = "causal"

    def __init__(self, model: Llama, tokenizer: Tokenizer, batch_size: int = 8, max_gen_toks: int = 256) -> None:
        super().__init__()
        self.model, self.tok = model, tokenizer
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        self.max_length = model.config.max_position_embeddings
        self._device = next(model.parameters()).device
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._rank, self._world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    # --- what the harness asks of a model class ------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"sentencepiece-{self.tok.sha256[:12]}"

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        # As the harness's HF class with a Llama tokenizer: BOS in front unless told otherwise
        # or the text already starts with it.
        bos = add_special_tokens if add_special_tokens is not None else not string.startswith("<s>")
        return self.tok.encode(string, bos=bos)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        out = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, tensor)
        return torch.stack(out)

    def gather_object(self, obj, dst: int = 0):
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        torch.distributed.barrier()

    # --- scoring ---------------------------------------------------------------------------

    @torch.no_grad()
    def _logprobs(self, inputs: list[list[int]]) -> torch.Tensor:
        """log-softmax of the model's logits for a batch of token lists, right-padded: (B, T, V)."""
        width = max(map(len, inputs))
        idx = torch.full((len(inputs), width), self.tok.eos_id, dtype=torch.long)
        for row, ids in zip(idx, inputs):
            row[:len(ids)] = torch.tensor(ids)
        return F.log_softmax(self.model(idx.to(self.device)).float(), dim=-1)

    def _batches(self, n: int) -> int:
        """Every rank runs as many forward passes as the busiest one (FSDP2 gathers in each)."""
        return self._agree_max(math.ceil(n / self.batch_size))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        # Longest first, so each batch holds similar lengths and little padding.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list = [None] * len(requests)
        for b in range(self._batches(len(requests))):
            chunk = order[b * self.batch_size:(b + 1) * self.batch_size]
            if not chunk:  # this rank is done: a stand-in batch keeps the collectives in step
                self._logprobs([[self.tok.bos_id]])
                continue
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in chunk]
            for i, inp, lp in zip(chunk, inputs, self._logprobs(inputs)):
                continuation = requests[i][2]
                window = lp[len(inp) - len(continuation):len(inp)]  # (len(continuation), V)
                target = torch.tensor(continuation, device=window.device)
                results[i] = (float(window.gather(1, target[:, None]).sum()), bool((window.argmax(-1) == target).all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for context, target in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[r] += logprob
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for n in range(self._agree_max(len(requests))):
            if n < len(requests):
                context, kwargs = requests[n].args
            else:  # a stand-in request keeps this rank's forward passes in step with the others
                context, kwargs = "", {"max_gen_toks": 0}
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            limit = kwargs.get("max_gen_toks", self.max_gen_toks)
            ids = self.tok_encode(context)[-(self.max_length - 1):] if context else [self.tok.bos_id]
            text = self._generate(ids, until, min(limit, self.max_length - len(ids)))
            if n < len(requests):
                out.append(text)
        return out

    def _generate(self, ids: list[int], until: list[str], limit: int) -> str:
        """Greedy continuation of ``ids`` with the KV cache, cut at the first stop string. Under
        several processes every rank runs as many decoding steps as the longest needs (a rank that
        is done runs a one-token stand-in), since each forward pass gathers the sharded weights."""
        steps = self._agree_max(limit)
        cache = self.model.new_kv_cache(1, len(ids) + limit)
        tokens, step_input, pos, done = [], torch.tensor([ids], device=self.device), 0, limit <= 0
        for _ in range(steps):
            if done:
                self.model(torch.tensor([[self.tok.bos_id]], device=self.device), pos=0, cache=cache)
            else:
                logits = self.model(step_input, pos=pos, cache=cache)[:, -1, :self.tok.vocab_size]  # ids it can decode
                pos += step_input.size(1)
                step_input = sample_next(logits, 0.0, None, 1.0, None)
                tokens.append(int(step_input))
                done = (tokens[-1] == self.tok.eos_id or len(tokens) >= limit
                        or any(stop in self.tok_decode(tokens) for stop in until))
            if self._all_done(done):
                break
        text = self.tok_decode([t for t in tokens if t != self.tok.eos_id])
        for stop in until:
            text = text.split(stop)[0]
        return text

    def _agree_max(self, value: int) -> int:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def _all_done(self, done: bool) -> bool:
        if self.world_size == 1:
            return done
        t = torch.tensor([0 if done else 1], device=self.device)
        torch.distributed.all_reduce(t)
        return int(t.item()) == 0

