"""Downstream evaluation: the lm-eval adapter, task groups, bits per byte, passkey retrieval and the
in-loop callback."""
