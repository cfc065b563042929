"""Weight averaging: `tinytrain average CKPT CKPT ... OUT`, and `--ema CKPT OUT` for the moving
average kept during training (tinytrain.train.ema).

The average of the last checkpoints of a run (uniform, or exponentially weighted toward the newest)
is usually a better model than any one of them late in a run whose learning rate stays high
(a stable-phase checkpoint of a warmup-stable-decay run, or the end of a long cosine). Checkpoints
are read as `generate` reads them (sharded ones without a GPU or a process group), one tensor at
a time across all of them, summed in fp32, and written as a converted checkpoint folder that
init_from, generate, evaluate and `convert to-hf` read.
"""

from __future__ import annotations

from pathlib import Path

from tinytrain.errors import CheckpointError, ConfigError
from tinytrain.store.checkpoint import Pretrained, load_pretrained

MODES = ("uniform", "exponential")


def average_weights(sources: list[Pretrained], weights: list[float]):
    """(name, weighted sum) for each parameter, one at a time, in the checkpoints' own dtype."""
    import torch

    streams = [source.tensors()[1] for source in sources]
    shapes = sources[0].config.parameter_shapes()
    for name in shapes:
        total, dtype = None, None
        for stream, w in zip(streams, weights):
            got, tensor = next(stream)
            assert got == name, (got, name)  # every source streams the one shape table in order
            dtype = dtype or tensor.dtype
            term = tensor.to(torch.float32) * w
            total = term if total is None else total.add_(term)
        yield name, total.to(dtype)


def average(checkpoints: list[str], out: str | Path, mode: str = "uniform", decay: float = 0.5) -> Path:
    """Average the weights of ``checkpoints`` (oldest to newest by their step, or as given when a
    step is unknown) into the new folder ``out``. ``exponential`` weighs the newest 1, the one
    before ``decay``, then ``decay``**2, ... (normalised)."""
    from tinytrain.store.hf import write_weights_folder

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder")
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not 0 < decay < 1:
        raise ConfigError(f"--decay must be in (0, 1), got {decay}")
    if len(checkpoints) < 2:
        raise ConfigError(f"average needs at least two checkpoints, got {len(checkpoints)}")
    sources = [load_pretrained(c, need_tokenizer=True) for c in checkpoints]
    first = sources[0]
    for path, source in zip(checkpoints[1:], sources[1:]):
        if source.config.trained() != first.config.trained():
            raise CheckpointError(f"{path} has a different architecture from {checkpoints[0]}: "
                                  + source.config.differences(first.config, "this", "first"))
        if source.tokenizer.read_bytes() != first.tokenizer.read_bytes():
            raise CheckpointError(f"{path} has a different tokenizer from {checkpoints[0]}; averaging needs one "
                                  "vocabulary")
    steps = [s.meta().get("step") for s in sources]
    order = list(range(len(sources)))
    if all(step is not None for step in steps):
        order.sort(key=lambda i: steps[i])
    raw = [1.0] * len(order) if mode == "uniform" else [decay ** (len(order) - 1 - rank) for rank in range(len(order))]
    weights = [w / sum(raw) for w in raw]
    chosen = [sources[i] for i in order]
    newest = chosen[-1]
    meta = newest.meta()
    return write_weights_folder(out, first.config, first.config.parameter_shapes(), average_weights(chosen, weights),
                                first.tokenizer, {
                                    "step": steps[order[-1]], "tokens": meta.get("tokens"),
                                    "source": {"format": "average", "mode": mode,
                                               **({"decay": decay} if mode == "exponential" else {}),
                                               "checkpoints": [{"path": str(s.folder.resolve()), "step": steps[i],
                                                                "weight": round(w, 6)}
                                                               for i, s, w in zip(order, chosen, weights)]},
                                }, metadata={"source": "average"})


def export_average(checkpoint: str, out: str | Path) -> Path:
    """The moving average of the weights kept by a run with model.ema_decay, as a checkpoint folder."""
    from tinytrain.store.hf import write_weights_folder

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder")
    source = load_pretrained(checkpoint, need_tokenizer=True)
    if source.kind != "tinytrain":
        raise CheckpointError(f"{checkpoint} is a Hugging Face folder; a weight average lives in a training checkpoint")
    source.average = True
    shapes, stream = source.tensors()
    meta = source.meta()
    return write_weights_folder(out, source.config, shapes, stream, source.tokenizer, {
        "step": meta.get("step"), "tokens": meta.get("tokens"),
        "source": {"format": "ema", "path": str(source.folder.resolve())},
    }, metadata={"source": "ema"})


def main(argv: list[str]) -> None:
    from tinytrain.errors import argument_parser

    parser = argument_parser(prog="tinytrain average",
                             usage="tinytrain average CHECKPOINT CHECKPOINT [...] OUT [--mode exponential --decay D]\n"
                                   "       tinytrain average --ema CHECKPOINT OUT",
                             description="Average the weights of several checkpoints into a new checkpoint folder.")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="two or more checkpoints (run folders, step-N folders, sharded or not, HF folders), "
                             "then the new output folder")
    parser.add_argument("--mode", choices=MODES, default="uniform")
    parser.add_argument("--decay", type=float, default=0.5,
                        help="exponential: each older checkpoint weighs this times the next newer one")
    parser.add_argument("--ema", action="store_true",
                        help="write the moving average a run kept (model.ema_decay): CHECKPOINT OUT")
    args = parser.parse_args(argv)
    if args.ema:
        if len(args.paths) != 2:
            parser.error("--ema takes one checkpoint and an output folder")
        print(export_average(*args.paths))
        return
    if len(args.paths) < 3:
        parser.error("give at least two checkpoints and an output folder")
    print(average(args.paths[:-1], args.paths[-1], args.mode, args.decay))

