"""An encoder (bert) build over HTTP: /v1/embeddings through the official openai client, generation refused."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch

from .conftest import _launcher


@pytest.fixture(scope="module")
def encoder_server(st_bert_build, tmp_path_factory):
    launcher = _launcher(st_bert_build(), tmp_path_factory)
    launch = next(launcher)
    yield launch("--served-model-name", "tiny-bert")
    next(launcher, None)  # stops it


@pytest.fixture
def encoder_client(encoder_server):
    return openai.OpenAI(base_url=encoder_server.api, api_key="unused", max_retries=0, timeout=60)


def test_embeddings_equal_sentence_transformers_over_http(encoder_client, st_bert_dir):
    from sentence_transformers import SentenceTransformer

    texts = ["hello world", "the quick brown fox jumps over the lazy dog", "a"]
    response = encoder_client.embeddings.create(model="tiny-bert", input=texts)
    got = torch.tensor([d.embedding for d in sorted(response.data, key=lambda d: d.index)])
    want = SentenceTransformer(str(st_bert_dir()), device="cpu").encode(texts, convert_to_tensor=True).float()
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() >= 0.9999
    # [CLS] and [SEP] counted, as the tokenizer adds them; "jumps" is jump ##s
    assert response.usage.prompt_tokens == 4 + 12 + 3
    as_base64 = encoder_client.embeddings.create(model="tiny-bert", input=texts[0], encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(as_base64.data[0].embedding), dtype="<f4")
    torch.testing.assert_close(torch.from_numpy(decoded.copy()), got[0])


def test_generation_requests_get_a_400_naming_the_model_kind(encoder_client):
    with pytest.raises(openai.BadRequestError, match=r"encoder \(model_type 'bert'\): it serves embeddings only"):
        encoder_client.completions.create(model="tiny-bert", prompt="hello", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match=r"encoder \(model_type 'bert'\)"):
        encoder_client.chat.completions.create(model="tiny-bert", messages=[{"role": "user", "content": "hi"}])
    assert [m.id for m in encoder_client.models.list().data] == ["tiny-bert"]
    # the server is still serving
    assert len(encoder_client.embeddings.create(model="tiny-bert", input="hello").data[0].embedding) == 64


def test_the_empty_text_is_embedded_over_http(encoder_client, st_bert_dir):
    """"" is [CLS] [SEP] to the tokenizer and a vector to sentence-transformers: a 200, not an empty-input 400."""
    from sentence_transformers import SentenceTransformer

    response = encoder_client.embeddings.create(model="tiny-bert", input=["", "a"])
    got = torch.tensor([d.embedding for d in sorted(response.data, key=lambda d: d.index)])
    want = SentenceTransformer(str(st_bert_dir()), device="cpu").encode(["", "a"], convert_to_tensor=True).float()
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() >= 0.9999
    assert response.usage.prompt_tokens == 2 + 3
    with pytest.raises(openai.BadRequestError, match="input is empty"):  # no tokens at all: still refused
        encoder_client.embeddings.create(model="tiny-bert", input=[[]])
