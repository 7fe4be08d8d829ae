"""The served tokenizer from the build's tokenizer snapshot (compiler/tokenizer_snapshot.py), with the `tokenizers`
library alone: no transformers import on the way to the first answer.

It offers what pllm and its users call on a transformers tokenizer, with the same results: the backend is the one
transformers built (its JSON), encoding and decoding call it as transformers' TokenizersBackend does, and chat
templates render through chat_template.py. `transformers()` loads the transformers tokenizer of the same files, once,
for what needs that type (xgrammar's TokenizerInfo, for structured output).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from pllm.models.chat_template import render_chat


class Encoding(dict):
    """The result of calling the tokenizer: `.input_ids` and `["input_ids"]`, as transformers' BatchEncoding."""

    @property
    def input_ids(self):
        return self["input_ids"]


def clean_up_tokenization(text: str) -> str:
    """transformers' clean-up of tokenization spaces (for WordPiece-style decoders)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class FastTokenizer:
    def __init__(self, snapshot: dict, backend_json: str, backend: Any, name_or_path: str,
                 load_transformers: Callable[[], Any]) -> None:
        """snapshot: compiler/tokenizer_snapshot.py's facts; backend_json: its `tokenizers` backend as JSON text, and
        backend that text parsed (parse_backend)."""
        self._backend_json = backend_json
        self._tokenizer = backend
        self._truncating: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._load_transformers = load_transformers
        self._transformers: Any = None
        self.special_tokens_map: dict[str, str] = snapshot["special_tokens_map"]
        self.all_special_ids: list[int] = snapshot["all_special_ids"]
        self.clean_up_tokenization_spaces: bool = snapshot["clean_up_tokenization_spaces"]
        self.truncation_side: str = snapshot["truncation_side"]
        self.chat_template: str | None = snapshot["chat_template"]
        self.name_or_path = name_or_path
        self._tokenizer.encode_special_tokens = snapshot["split_special_tokens"]

    @staticmethod
    def parse_backend(backend_json: str):
        """A `tokenizers` Tokenizer from its JSON text, as transformers leaves it for a plain call."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(backend_json)
        tok.no_truncation()  # transformers clears both on a call without truncation or padding
        tok.no_padding()
        return tok

    # special tokens
    def __getattr__(self, name: str):
        # bos_token, eos_token, pad_token, unk_token, ... and their _id forms, as transformers answers them
        if name.endswith("_token_id"):
            token = self.__dict__.get("special_tokens_map", {}).get(name.removesuffix("_id"))
            return None if token is None else self.convert_tokens_to_ids(token)
        if name.endswith("_token"):
            return self.__dict__.get("special_tokens_map", {}).get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # encoding
    def __call__(self, text: str | list[str], add_special_tokens: bool = True, truncation: bool = False,
                 max_length: int | None = None) -> Encoding:
        if isinstance(text, (list, tuple)):
            return Encoding(input_ids=[self._encode(t, add_special_tokens, truncation, max_length) for t in text])
        return Encoding(input_ids=self._encode(text, add_special_tokens, truncation, max_length))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._encode(text, add_special_tokens, False, None)

    def _encode(self, text: str, add_special_tokens: bool, truncation: bool, max_length: int | None) -> list[int]:
        backend = self._tokenizer
        if truncation and max_length is not None:
            backend = self._truncating_backend(max_length)
        return backend.encode(text, add_special_tokens=add_special_tokens).ids

    def _truncating_backend(self, max_length: int):
        """A backend of its own per max_length, truncating as transformers sets it (longest_first, stride 0), so no
        call ever changes the settings another thread's call is using."""
        with self._lock:
            tok = self._truncating.get(max_length)
            if tok is None:
                tok = self.parse_backend(self._backend_json)
                tok.enable_truncation(max_length, stride=0, strategy="longest_first", direction=self.truncation_side)
                tok.encode_special_tokens = self._tokenizer.encode_special_tokens
                self._truncating[max_length] = tok
            return tok

    # decoding
    def decode(self, token_ids: int | list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        text = self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None \
            else clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean else text

    # vocabulary
    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._tokenizer.token_to_id(tokens)
        return [self._tokenizer.token_to_id(t) for t in tokens]

    # chat
    def apply_chat_template(self, conversation: list[dict], tools: list[dict] | None = None,
                            documents: list[dict] | None = None, add_generation_prompt: bool = False,
                            continue_final_message: bool | str = False, tokenize: bool = True,
                            **kwargs: Any) -> str | list[int]:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        text = render_chat(self.chat_template, conversation, self.special_tokens_map, tools=tools,
                           documents=documents, add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def transformers(self):
        """The transformers tokenizer of the same build files, loaded on first use (seconds)."""
        with self._lock:
            if self._transformers is None:
                self._transformers = self._load_transformers()
            return self._transformers
