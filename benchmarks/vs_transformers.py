"""Training-step speed of tinytrain's Llama against transformers' LlamaForCausalLM.

Both models are built from the same config with the same weights, take the same batch and the
same AdamW settings, and run in one process, alternating rounds (ours, theirs, ours, ...) so
machine noise hits both alike. Writes JSON with tokens/s of each, the ratio, and the machine.

    python -m benchmarks.vs_transformers --preset tiny --out benchmarks/results/vs_transformers-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from benchmarks.common import HF_LLAMA, command, machine, write_result
from tinytrain.model.llama import Llama, LlamaConfig
from tinytrain.train import parallel


def hf_model(config: LlamaConfig, ours: Llama):
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(hf_config)
    model.load_state_dict({("lm_head.weight" if k == "lm_head.weight" else "model." + k): v
                           for k, v in ours.state_dict().items()}, strict=True)
    return model, transformers.__version__


def make_step(model, optimizer, loss_fn):
    def step(idx, targets):
        loss = loss_fn(model, idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def ours_loss(model, idx, targets):
    return model(idx, targets)


def hf_loss(model, idx, targets):
    logits = model(input_ids=idx).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds (ABBA order)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile'd contestant")
    parser.add_argument("--out", default="benchmarks/results/vs_transformers.json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    # what no Hugging Face Llama computes (QK-norm, value embeddings) turned off: see benchmarks.common.HF_LLAMA
    config = LlamaConfig.from_name(args.preset, max_position_embeddings=max(args.seq, 16), **HF_LLAMA)
    ours = Llama(config)
    theirs, hf_version = hf_model(config, ours)
    ours.train()
    theirs.train()
    idx = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    targets = torch.randint(0, config.vocab_size, (args.batch, args.seq))

    # Same weights and batch give the same loss: the comparison is of one computation.
    with torch.no_grad():
        first = (ours_loss(ours, idx, targets).item(), hf_loss(theirs, idx, targets).item())
    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    steps = {"tinytrain": make_step(ours, adamw(ours), ours_loss),
             "transformers": make_step(theirs, adamw(theirs), hf_loss)}
    compile_s = None
    if args.compile:
        compiled = copy.deepcopy(ours)
        parallel.apply_compile(compiled)
        steps["tinytrain_compiled"] = make_step(compiled, adamw(compiled), ours_loss)
        start = time.perf_counter()
        steps["tinytrain_compiled"](idx, targets)
        compile_s = time.perf_counter() - start
    for step in steps.values():
        for _ in range(args.warmup):
            step(idx, targets)
    times = {name: [] for name in steps}
    order = list(steps)
    for r in range(args.rounds):
        # Alternate the order (ABBA), so drift in machine speed favours no contestant.
        for name in (order if r % 2 == 0 else order[::-1]):
            step = steps[name]
            for _ in range(args.steps):
                start = time.perf_counter()
                step(idx, targets)
                times[name].append(time.perf_counter() - start)

    tokens = args.batch * args.seq
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "benchmark": "train_step_vs_transformers",
        "preset": args.preset,
        "params": config.num_params(),
        "batch": args.batch,
        "seq_len": args.seq,
        "steps_per_model": len(times["tinytrain"]),
        "initial_loss": {"tinytrain": first[0], "transformers": first[1]},
        "median_step_s": medians,
        "tokens_per_s": {name: tokens / m for name, m in medians.items()},
        "ratio_tinytrain_over_transformers": medians["transformers"] / medians["tinytrain"],
        "ratio_tinytrain_compiled_over_transformers":
            medians["transformers"] / medians["tinytrain_compiled"] if args.compile else None,
        "compile_seconds": compile_s,
        # The same ratio within each round: its spread shows how much of the figure is noise.
        "ratio_per_round": [
            statistics.median(times["transformers"][r * args.steps:(r + 1) * args.steps])
            / statistics.median(times["tinytrain"][r * args.steps:(r + 1) * args.steps])
            for r in range(args.rounds)
        ],
        "step_times_s": times,
        "transformers": hf_version,
        "command": command("vs_transformers", argv),
        "machine": machine(),
    }
    write_result(result, args.out)
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "ratio_tinytrain_over_transformers",
                                             "ratio_tinytrain_compiled_over_transformers")}, indent=2))
    return result


if __name__ == "__main__":
    main()
