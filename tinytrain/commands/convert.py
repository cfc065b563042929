"""`tinytrain convert`: Hugging Face Llama folders to tinytrain checkpoints and back."""

from __future__ import annotations


def main(argv: list[str]) -> None:
    from tinytrain.errors import argument_parser
    from tinytrain.store import convert

    parser = argument_parser(prog="tinytrain convert",
                                     description="Convert between Hugging Face Llama folders and tinytrain checkpoints.")
    sub = parser.add_subparsers(dest="direction", required=True)
    p_from = sub.add_parser("from-hf", help="HF LlamaForCausalLM folder -> tinytrain checkpoint folder")
    p_from.add_argument("hf_dir")
    p_from.add_argument("out")
    p_to = sub.add_parser("to-hf", help="tinytrain checkpoint (sharded or not) -> HF LlamaForCausalLM folder")
    p_to.add_argument("checkpoint", help="a checkpoint folder, its 'last' link, or a run folder")
    p_to.add_argument("out")
    p_to.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                      help="weights' dtype in the export (default: as trained)")
    args = parser.parse_args(argv)
    if args.direction == "from-hf":
        print(convert.from_hf(args.hf_dir, args.out))
    else:
        print(convert.to_hf(args.checkpoint, args.out, args.dtype))
