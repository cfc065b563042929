"""`tinytrain consolidate`: a checkpoint's weights (sharded or not) as one file."""

from __future__ import annotations


def main(argv: list[str]) -> None:
    from tinytrain.errors import argument_parser
    from tinytrain.store.checkpoint import consolidate

    parser = argument_parser(prog="tinytrain consolidate",
                                     description="Write a checkpoint's model weights (sharded or not) as one file.")
    parser.add_argument("checkpoint", help="a checkpoint folder, its 'last' link, or a run folder")
    parser.add_argument("out", help="the output file (a torch.save'd state dict with HF Llama names)")
    args = parser.parse_args(argv)
    print(consolidate(args.checkpoint, args.out))
