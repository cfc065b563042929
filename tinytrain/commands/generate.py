"""`tinytrain generate`: continue a prompt with a trained model (or a large one steered by two small ones)."""

from __future__ import annotations

import math


def add_proxy_arguments(parser) -> None:
    """--proxy_tuned, --proxy_base and --proxy_alpha (generate and evaluate)."""
    parser.add_argument("--proxy_tuned", default=None,
                        help="proxy-tuning: a small tuned model (tinytrain or HF folder) whose difference from "
                        "--proxy_base steers the checkpoint at every token")
    parser.add_argument("--proxy_base", default=None, help="proxy-tuning: the small model before its tuning")
    parser.add_argument("--proxy_alpha", type=float, default=1.0,
                        help="proxy-tuning: logits(large) + ALPHA x (logits(tuned) - logits(base)) (default 1)")


def check_proxy_arguments(parser, args) -> None:
    if bool(args.proxy_tuned) != bool(args.proxy_base):
        parser.error("--proxy_tuned and --proxy_base go together: the tuned small model and the same model before "
                     "tuning")
    if args.proxy_alpha != 1.0 and not args.proxy_tuned:
        parser.error("--proxy_alpha needs --proxy_tuned and --proxy_base")
    if not math.isfinite(args.proxy_alpha):
        parser.error(f"--proxy_alpha must be a finite number, got {args.proxy_alpha}")


def main(argv: list[str]) -> None:
    from tinytrain.errors import argument_parser

    parser = argument_parser(prog="tinytrain generate", description="Continue a prompt with a trained model.")
    parser.add_argument("checkpoint", help="a checkpoint folder, its 'last' link, a run folder, or a HF Llama folder")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from BOS alone)")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top_k", type=int, default=50, help="0 disables top-k filtering")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cpu")
    add_proxy_arguments(parser)
    args = parser.parse_args(argv)
    check_proxy_arguments(parser, args)
    for bad, message in ((args.max_new_tokens < 1, f"--max_new_tokens must be >= 1, got {args.max_new_tokens}"),
                         (args.temperature < 0, f"--temperature must be >= 0 (0 is greedy), got {args.temperature}"),
                         (args.top_k < 0, f"--top_k must be >= 0 (0 disables it), got {args.top_k}"),
                         (not 0 < args.top_p <= 1, f"--top_p must be in (0, 1], got {args.top_p}")):
        if bad:
            parser.error(message)

    import torch  # after the arguments: `generate --help` and its errors need no torch

    from tinytrain.model.sampling import generate
    from tinytrain.store.checkpoint import load_checkpoint, load_proxy_tuned

    if args.proxy_tuned:
        from tinytrain.data.tokenizer import Tokenizer
        from tinytrain.store.checkpoint import load_pretrained

        ids = Tokenizer(load_pretrained(args.checkpoint, need_tokenizer=True).tokenizer).encode(args.prompt, bos=True)
        model, tok = load_proxy_tuned(args.checkpoint, args.proxy_tuned, args.proxy_base, args.proxy_alpha,
                                      args.device, prompt_tokens=len(ids))
    else:
        model, tok = load_checkpoint(args.checkpoint, device=args.device)
    prompt = torch.tensor([tok.encode(args.prompt, bos=True)], device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.top_p,
                   eos_id=tok.eos_id, generator=gen, vocab=tok.vocab_size)
    print(tok.decode(out[0].tolist()))
