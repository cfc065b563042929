"""tinytrain: pretrain small Llama-style language models (TinyLlama and smaller) with Lightning and FSDP2."""

__version__ = "0.1.0"
