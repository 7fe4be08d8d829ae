"""The LM head of a quantised build (`pllm-compile --quantization ... --lm-head int8|int6|float`).

With `--quantization`, the LM head is kept packed as INT8 with groups of 32 (models/quant.py's layout; what GGUF's
Q8_0 is, and what llama.cpp keeps its output matrix at for its 8-bit types): on a small model it is the largest
matrix a decode step reads (SmolLM2-135M: 49152 x 576, 56.6 MB in bf16, 0.7x all 30 int4 layers' 79.7 MB). The
embedding stays float: it is a row gather per token, not a matmul. With tied embeddings the packed head is a
separate tensor `lm_head` beside the float embedding, so the tie is broken in storage only (models/family.py's
`lm_head_weight` picks it). A GGUF file's Q8_0 output matrix (or its token embedding, when it has no output matrix)
is kept as its blocks, losslessly; any other type is quantised from the float values transformers reads.
`--lm-head int6` keeps it at 6 bits (INT6, groups of 32: 6.5 bits a weight), the share llama.cpp's 4-bit files give
their output matrix (Q6_K, 6.56): a quarter fewer of the step's largest read, always quantised from the float values.
"""

from __future__ import annotations

import enum
import logging

import torch

from pllm.compiler.quantize import Quantization, QuantizeError, quantize_int6, quantize_int8
from pllm.compiler.source import ModelSource
from pllm.models.family import LM_HEAD, RuntimeTensor
from pllm.models.quant import QuantFormat, QuantizedWeight, QuantScheme
from pllm.models.spec import ModelSpec

logger = logging.getLogger("pllm")
EMBEDDING = "embed_tokens"  # the runtime name of the token embedding, the head of a tied model
LM_HEAD_FORMAT = QuantFormat(QuantScheme.INT8, 32)  # one scale per 32 inputs: GGUF's Q8_0
LM_HEAD_INT6_FORMAT = QuantFormat(QuantScheme.INT6, 32)


class LmHead(enum.Enum):
    """How a build stores its LM head."""

    FLOAT = "float"  # in the build's dtype; with tied embeddings, the embedding itself
    INT8 = "int8"  # LM_HEAD_FORMAT, apart from the float embedding
    INT6 = "int6"  # LM_HEAD_INT6_FORMAT, apart from the float embedding

    @property
    def fmt(self) -> QuantFormat | None:
        """The packed head's format; None for a float head."""
        return {LmHead.INT8: LM_HEAD_FORMAT, LmHead.INT6: LM_HEAD_INT6_FORMAT}.get(self)


def choose_lm_head(requested: LmHead | None, quantization: Quantization | None, spec: ModelSpec) -> LmHead:
    """The build's LM head: `requested`, else INT8 with --quantization (float where the hidden size is no multiple
    of the group) and FLOAT without; refuses --lm-head without --quantization, naming the flag."""
    if quantization is None:
        if requested is not None:
            raise QuantizeError(f"--lm-head {requested.value} needs --quantization: a float build's LM head is in "
                                "--dtype")
        return LmHead.FLOAT
    fits = spec.hidden_size % LM_HEAD_FORMAT.group_size == 0  # (both packed heads' groups are 32)
    if requested is not None and requested.fmt is not None and not fits:
        raise QuantizeError(f"--lm-head {requested.value}: the hidden size {spec.hidden_size} is not a multiple of the "
                            f"head's group of {requested.fmt.group_size}")
    if requested is None and not fits:
        logger.info("lm head float: the hidden size %d is not a multiple of the int8 head's group of %d",
                    spec.hidden_size, LM_HEAD_FORMAT.group_size)
        return LmHead.FLOAT
    return LmHead.INT8 if requested is None else requested


def head_source(layout: dict[str, RuntimeTensor]) -> str:
    """The runtime tensor whose values the head is: the model's own `lm_head`, else (tied) the embedding."""
    return LM_HEAD if LM_HEAD in layout else EMBEDDING


def pack_lm_head(source: ModelSource, entry: RuntimeTensor, tensor: torch.Tensor, quantization: Quantization,
                 head: LmHead = LmHead.INT8) -> QuantizedWeight:
    """The head's float values [vocab, hidden] (as read from the source) -> head.fmt: for INT8 a GGUF file's Q8_0
    blocks as they are (checked by source.kept_blocks to decode to `tensor` bit for bit), else quantised."""
    (hf_name,) = entry.hf_names
    if head is LmHead.INT6:
        logger.info("lm head int6 group 32: quantised from the float values of '%s'", hf_name)
        return quantize_int6(tensor, LM_HEAD_INT6_FORMAT.group_size)
    if quantization is Quantization.GGUF:
        kept = source.kept_blocks(entry.hf_names)
        if kept is not None and kept.fmt == LM_HEAD_FORMAT and kept.shape == tuple(tensor.shape):
            logger.info("lm head int8 group 32: the file's Q8_0 blocks of '%s' kept as they are", hf_name)
            return kept
        stored = source.gguf_type(hf_name) or "a 4-bit type"
        logger.info("lm head int8 group 32: '%s' is %s in the file, quantised from its float values", hf_name,
                    stored)
    else:
        logger.info("lm head int8 group 32: quantised from '%s'", hf_name)
    return quantize_int8(tensor, LM_HEAD_FORMAT.group_size)
