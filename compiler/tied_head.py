"""A config that says tied, a checkpoint that holds its own LM head (beside the embedding, or in its place): settled
as transformers settles it."""

from __future__ import annotations

import dataclasses
import logging

import torch

from pllm.compiler.source import ModelSource
from pllm.models.family import LM_HEAD
from pllm.models.registry import family_of
from pllm.models.spec import ModelSpec

logger = logging.getLogger("pllm")


def untie_stored_head(source: ModelSource, spec: ModelSpec) -> ModelSpec:
    """`spec`, untied when its config ties the LM head to the embedding (`tie_word_embeddings` true, or the family's
    default) yet the checkpoint also holds an LM head with other values. transformers then keeps both ("we will NOT
    tie them") and its logits read the stored head; a build that read the embedding instead would greedy-decode
    differently from the same folder under transformers. Equal values keep the tie (one tensor stored, not two).
    A tied checkpoint that stores the LM head and no embedding is one weight under the other name, as transformers
    loads it: the embedding is read from the stored head (source.alias).
    A GGUF source never gets here untied: its config is tied exactly when the file has no output matrix."""
    if not spec.tie_word_embeddings:
        return spec
    untied = dataclasses.replace(spec, tie_word_embeddings=False)
    family = family_of(spec.model_type, source.config_file)
    entry = family.weight_layout(untied).get(LM_HEAD)
    if entry is None:  # a family with no LM head of its own to read (an encoder)
        return spec
    (head_name,) = entry.hf_names
    if head_name in source.tensor_file and family.hf_embedding not in source.tensor_file:
        logger.info("%s: the tied embedding '%s' is read from the stored '%s'", source.path, family.hf_embedding,
                    head_name)
        source.alias(family.hf_embedding, head_name)
        return spec
    if head_name not in source.tensor_file or family.hf_embedding not in source.tensor_file:
        return spec  # the missing tensor is named by the weight conversion, as for any other
    head, embedding = source.load_tensor(head_name), source.load_tensor(family.hf_embedding)
    if head.shape == embedding.shape and torch.equal(head, embedding):
        return spec
    logger.warning("%s: key 'tie_word_embeddings' ties the LM head to '%s', but %s also holds '%s' with other values; "
                   "using the stored head as transformers does (set tie_word_embeddings false to silence this)",
                   source.config_file, family.hf_embedding, source.path, head_name)
    return untied
