"""bert encoders: embeddings equal sentence-transformers' on the same weights (fp32), on every backend, batched
or alone; the pooling recipe comes from the sentence-transformers files; an encoder build only embeds."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pllm.compiler.build import BuildOptions, build
from pllm.compiler.manifest import open_build
from pllm.models.config import ConfigError
from pllm.runtime.engine.llm import LLM

TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "a",
    "attention blocks cache embedding models, 12345!",
    "the lazy dog sleeps; the quick fox jumped over it twice and then once more for good measure",
    "embed",
    "zyx wvu tsr qpo nml kji hgf edc ba 0987654321",
    "hello hello hello world world",
]
MIN_COSINE = 0.9999  # the promise: fp32 on the same weights


def reference(folder, texts: list[str]) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return model.encode(texts, convert_to_tensor=True, batch_size=4).float()  # [num_texts, hidden]


def embed(build_dir, texts: list[str], **settings) -> torch.Tensor:
    llm = LLM(str(build_dir), **settings)
    return torch.tensor([out.outputs.embedding for out in llm.embed(texts)])  # [num_texts, hidden]


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cosine.min() >= MIN_COSINE, cosine
    # the same length too: normalised or not, as sentence-transformers' modules say
    torch.testing.assert_close(got.norm(dim=-1), want.norm(dim=-1), rtol=1e-4, atol=1e-5)


def test_the_test_texts_tokenise_into_real_vocabulary_ids(st_bert_dir):
    """The equivalence tests below compare real token embeddings: the helper's tokenizer has its whole WordPiece
    vocabulary (not only the specials), so the texts become many distinct ids and no [UNK]."""
    from sentence_transformers import SentenceTransformer

    tokenizer = SentenceTransformer(str(st_bert_dir()), device="cpu").tokenizer
    ids = [i for text in TEXTS for i in tokenizer(text)["input_ids"]]
    assert len(tokenizer) > 100
    assert tokenizer.unk_token_id not in ids
    assert len(set(ids)) >= 40, sorted(set(ids))
    assert tokenizer.convert_ids_to_tokens(tokenizer("the quick brown fox jumps")["input_ids"]) == [
        "[CLS]", "the", "quick", "brown", "fox", "jump", "##s", "[SEP]"]


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("lasttoken", True)])
def test_embeddings_equal_sentence_transformers(st_bert_dir, st_bert_build, backend, pooling, normalize):
    want = reference(st_bert_dir(pooling, normalize), TEXTS)
    assert_close(embed(st_bert_build(pooling, normalize), TEXTS, backend=backend), want)


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_a_batched_step_of_mixed_lengths_equals_one_text_at_a_time(st_bert_build, backend):
    build_dir = st_bert_build()
    # a 64-token budget (the longest text is 52 tokens): several steps, each packing whole texts of different
    # lengths, none split
    batched = embed(build_dir, TEXTS, backend=backend, max_num_batched_tokens=64)
    llm = LLM(str(build_dir), backend=backend)
    alone = torch.tensor([llm.embed(text)[0].outputs.embedding for text in TEXTS])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)


def test_texts_are_truncated_as_sentence_transformers_does(st_bert_dir, st_bert_build):
    """max_seq_length 12: [CLS], ten text tokens, [SEP]; sentence-transformers truncates silently, and so does pllm."""
    folder = st_bert_dir(max_seq_length=12)
    build_dir = st_bert_build(max_seq_length=12)
    assert open_build(build_dir).pooling.max_seq_length == 12
    long_texts = [TEXTS[4], TEXTS[6], TEXTS[0]]
    assert_close(embed(build_dir, long_texts), reference(folder, long_texts))
    llm = LLM(str(build_dir))
    assert [o.outputs.num_prompt_tokens for o in llm.embed(long_texts)] == [12, 12, 4]


def test_the_empty_text_is_embedded_as_sentence_transformers_does(st_bert_dir, st_bert_build):
    """"" tokenizes to [CLS] [SEP], which sentence-transformers embeds; one in a batch fails nothing."""
    texts = ["", TEXTS[0], ""]
    assert_close(embed(st_bert_build(), texts), reference(st_bert_dir(), texts))
    assert [o.outputs.num_prompt_tokens for o in LLM(str(st_bert_build())).embed(texts)] == [2, 4, 2]


def test_the_manifest_records_the_recipe(st_bert_build):
    pooling = open_build(st_bert_build("cls", False)).pooling
    assert (pooling.pooling.value, pooling.normalize, pooling.max_seq_length) == ("cls", False, 128)
    assert pooling.source.startswith("modules.json, 1_Pooling/config.json")


def test_without_sentence_transformers_files_the_default_is_what_sentence_transformers_loads(
    st_bert_dir, tmp_path
):
    """A plain Hugging Face BERT folder: sentence-transformers wraps it in mean pooling without normalisation, so
    the documented default is the same."""
    plain = tmp_path / "plain"
    shutil.copytree(st_bert_dir(), plain)
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        (plain / name).unlink()
    shutil.rmtree(plain / "1_Pooling")
    shutil.rmtree(plain / "2_Normalize")
    build_dir = build(str(plain), tmp_path / "build", BuildOptions(dtype="float32", progress=False))
    pooling = open_build(build_dir).pooling
    assert (pooling.pooling.value, pooling.normalize, pooling.source) == ("mean", False, "default")
    assert_close(embed(build_dir, TEXTS), reference(plain, TEXTS))


def test_pooling_named_per_request_overrides_the_builds(st_bert_dir, st_bert_build):
    llm = LLM(str(st_bert_build("mean", True)))
    got = torch.tensor([o.outputs.embedding for o in llm.embed(TEXTS, pooling="cls")])
    want = reference(st_bert_dir("cls", True), TEXTS)  # the same weights (same seed), pooled from [CLS]
    assert_close(got, want)


def test_an_encoder_build_keeps_no_kv_cache_and_only_embeds(st_bert_build):
    llm = LLM(str(st_bert_build()))
    runner = llm.engine.runner
    assert runner.kv_cache is None and runner.kv_caches == [] and runner.kv_bytes_per_block == 0
    for call in (lambda: llm.generate("hello"), lambda: llm.chat([{"role": "user", "content": "hello"}])):
        with pytest.raises(ValueError, match=r"encoder \(model_type 'bert'\): it serves embeddings only"):
            call()
    assert not llm.engine.has_unfinished()


def test_an_input_longer_than_the_token_budget_is_refused_by_name(st_bert_build):
    """An encoder cannot chunk a prompt: one longer than the step's token budget could never run."""
    llm = LLM(str(st_bert_build()), max_num_batched_tokens=8)
    with pytest.raises(ValueError, match=r"input of 12 tokens exceeds max_num_batched_tokens 8.*encoder"):
        llm.embed("the quick brown fox jumps over the lazy dog")
    assert len(llm.embed("hello world")[0].outputs.embedding) == 64  # 4 tokens fit: served


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("hidden_act", "gelu_new", "hidden_act 'gelu_new' is not supported for bert"),
        ("position_embedding_type", "relative_key", "position_embedding_type 'relative_key' is not supported"),
        ("is_decoder", True, "is_decoder=true is not supported"),
    ],
)
def test_config_options_that_change_the_math_are_refused(st_bert_dir, tmp_path, key, value, match):
    folder = tmp_path / "model"
    shutil.copytree(st_bert_dir(), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ConfigError, match=match):
        build(str(folder), tmp_path / "build", BuildOptions(progress=False))


@pytest.mark.parametrize(
    "file,edit,match",
    [
        ("modules.json", lambda m: m + [{"idx": 3, "name": "3", "path": "3_Dense",
                                         "type": "sentence_transformers.models.Dense"}],
         "module type 'sentence_transformers.models.Dense' is not supported"),
        ("1_Pooling/config.json", lambda c: {**c, "pooling_mode": "max"}, "pooling mode 'max' is not supported"),
        ("sentence_bert_config.json", lambda c: {**c, "do_lower_case": True}, "do_lower_case=true is not supported"),
    ],
)
def test_sentence_transformers_modules_pllm_does_not_implement_are_refused(st_bert_dir, tmp_path, file, edit, match):
    folder = tmp_path / "model"
    shutil.copytree(st_bert_dir(), folder)
    path = folder / file
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ConfigError, match=match):
        build(str(folder), tmp_path / "build", BuildOptions(progress=False))
    assert not (tmp_path / "build").exists()


def test_a_tampered_recipe_is_named_when_the_build_is_opened(st_bert_build, tmp_path):
    from pllm.compiler.manifest import MANIFEST_DIGEST_KEY, BuildDirError, manifest_digest

    copy = tmp_path / "build"
    shutil.copytree(st_bert_build(), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["pooling"]["pooling"] = "max"  # re-signed: only the key check can catch it
    manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BuildDirError, match=r"key 'pooling.pooling' must be one of last, mean, cls, got 'max'"):
        open_build(copy)


def test_every_layout_tensor_reaches_the_model_once():
    """The encoder's side of tests/models/test_registry.py: no final norm, no LM head, every tensor used once."""
    from dataclasses import fields

    from pllm.models.registry import family_of

    family = family_of("bert", "cfg.json")
    config = {"model_type": "bert", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 32}
    spec = family.spec_from_config(config, "cfg.json")
    layout = family.weight_layout(spec)
    weights = {name: torch.zeros(entry.shape) for name, entry in layout.items()}
    model = family.model(spec, weights, None, 32)  # the constructor only keeps the ops
    per_layer = [getattr(layer, f.name) for layer in model.layers for f in fields(layer)]
    embeddings = [weights[n] for n in ("embed_tokens", "embed_positions", "embed_token_types", "embed_norm",
                                       "embed_norm_bias")]
    assert sorted(id(t) for t in per_layer + embeddings) == sorted(id(t) for t in weights.values())
    assert all(not name.startswith("pooler.") for entry in layout.values() for name in entry.hf_names)
