"""`tinytrain generate`: continue a prompt with a trained model."""

from __future__ import annotations


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
    args = parser.parse_args(argv)
    for bad, message in ((args.max_new_tokens < 1, f"--max_new_tokens must be >= 1, got {args.max_new_tokens}"),
                         (args.temperature < 0, f"--temperature must be >= 0 (0 is greedy), got {args.temperature}"),
                         (args.top_k < 0, f"--top_k must be >= 0 (0 disables it), got {args.top_k}"),
                         (not 0 < args.top_p <= 1, f"--top_p must be in (0, 1], got {args.top_p}")):
        if bad:
            parser.error(message)

    import torch  # after the arguments: `generate --help` and its errors need no torch

    from tinytrain.model.sampling import generate
    from tinytrain.store.checkpoint import load_checkpoint

    model, tok = load_checkpoint(args.checkpoint, device=args.device)
    prompt = torch.tensor([tok.encode(args.prompt, bos=True)], device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.top_p,
                   eos_id=tok.eos_id, generator=gen, vocab=tok.vocab_size)
    print(tok.decode(out[0].tolist()))
