"""Starting a run from other weights (`model.init_from`): a tinytrain checkpoint or a Hugging Face
Llama folder, with a fresh optimizer at step 0. Only the context window may differ from the recipe
(a context extension); the data must be tokenized with the weights' tokenizer."""

from __future__ import annotations

import logging
from typing import Optional

from tinytrain.errors import ConfigError
from tinytrain.model.llama import Llama, LlamaConfig

log = logging.getLogger(__name__)

REQUIRED = "???"  # a recipe's placeholder for "the user must name the weights"


def check_given(init_from: Optional[str]) -> None:
    if init_from == REQUIRED:
        raise ConfigError("model.init_from is required by this recipe: pass --model.init_from with a checkpoint "
                          "folder (e.g. from `tinytrain convert from-hf`) or a Hugging Face Llama folder")


def check_tokenizer(init_from: str, spec) -> None:
    """The data (``spec``, the datamodule's) must be tokenized with the tokenizer the weights learnt."""
    from tinytrain.data.shards import sha256_file
    from tinytrain.store.checkpoint import load_pretrained

    source = load_pretrained(init_from)
    if source.tokenizer is not None and spec.tokenizer_sha256 != sha256_file(source.tokenizer):
        raise ConfigError(f"model.init_from {init_from} was trained with another tokenizer than the data's "
                          f"({spec.tokenizer}); prepare the data with {source.tokenizer}")


def load_initial_weights(model: Llama, init_from: str, config: LlamaConfig) -> None:
    """Read ``init_from``'s weights into ``model`` (sharded or not), refusing another architecture."""
    from tinytrain.store.checkpoint import load_pretrained
    from tinytrain.train import parallel

    source = load_pretrained(init_from)
    if source.config.architecture() != config.architecture():
        raise ConfigError(f"model.init_from {init_from} has a different architecture: "
                          + source.config.differences(config, "init_from", "recipe"))
    if source.config.trained() != config.trained():  # only the context window: a context extension
        log.info("extending the context of %s: %s", init_from, source.config.differences(config, "from", "to"))
    parallel.load_full_weights(model, source.weights())
    log.info("initialised from %s", init_from)
