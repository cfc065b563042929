"""The pure model: configuration and presets, the Llama blocks, attention kernels, the loss and sampling.
No Lightning, no files: tensors in, tensors out."""
