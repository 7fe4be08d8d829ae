"""A model's tokenizer files into a build: copied, named chat templates folded into the one config transformers
reads, loaded from the build's folder as serving will load them, and checked: it loads, it encodes, its chat
templates parse (models/chat_template.py's environment, the one serving renders with), and where its ids pass the
model's embedding rows it is said."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from pllm.compiler.source import ModelSource, ModelSourceError, confined, read_json
from pllm.compiler.tokenizer_snapshot import SAMPLE_TEXT, encoding_problem, write_tokenizer_snapshot
from pllm.models.chat_template import compile_template

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.txt",  # WordPiece (BERT) vocabularies of checkpoints without a tokenizer.json
)
JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
              "chat_template.json", "added_tokens.json", "generation_config.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' default chat template, a file of its own
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # its named templates beside it, <name>.jinja each

logger = logging.getLogger("pllm")


def iter_tokenizer_files(source: ModelSource) -> Iterator[Path]:
    root = source.files_root
    for fname in (*TOKENIZER_FILES, "generation_config.json"):
        f = source.tokenizer_dir / fname
        if f.is_file():
            confined(root, f, str(f))
            if fname in JSON_FILES:
                read_json(f)
            yield f


def _fold_named_templates(source: ModelSource, out_dir: Path, copied: list[str]) -> list[str]:
    """Named chat templates as transformers saves them: additional_chat_templates/<name>.jinja beside
    chat_template.jinja (the template named 'default'). transformers reads them all (with tools, 'tool_use'); a build
    keeps its tokenizer files in one flat folder, so they are written into its tokenizer_config.json as the list of
    {name, template} transformers also reads, in the order it would read the files, chat_template.jinja dropped."""
    folder = source.tokenizer_dir / CHAT_TEMPLATE_DIR
    if not folder.is_dir():
        return copied
    root = source.files_root
    templates: dict[str, str] = {}
    files = ([source.tokenizer_dir / CHAT_TEMPLATE_FILE] if CHAT_TEMPLATE_FILE in copied else []) + [
        f for f in sorted(folder.glob("*.jinja")) if f.is_file()]
    for f in files:
        name = "default" if f.parent != folder else f.name.removesuffix(".jinja")
        try:
            templates[name] = confined(root, f, str(f)).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelSourceError(f"{f}: cannot be read as a chat template ({e})") from None
    if set(templates) <= {"default"}:  # transformers reads a lone default as the one template it is
        return copied
    config_file = out_dir / "tokenizer_config.json"
    config = read_json(config_file) if config_file.exists() else {}
    config["chat_template"] = [{"name": name, "template": text} for name, text in templates.items()]
    config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    if CHAT_TEMPLATE_FILE in copied:
        (out_dir / CHAT_TEMPLATE_FILE).unlink()
    return [name for name in copied if name != CHAT_TEMPLATE_FILE] + (
        [] if "tokenizer_config.json" in copied else ["tokenizer_config.json"])


def _template_origin(source: ModelSource, name: str) -> Path:
    """The file a chat template of this name was most likely read from, for messages (a GGUF file: the file)."""
    if source.is_gguf:
        return source.path
    folder = source.tokenizer_dir
    own = folder / CHAT_TEMPLATE_FILE if name == "default" else folder / CHAT_TEMPLATE_DIR / f"{name}.jinja"
    return next((f for f in (own, folder / "chat_template.json", folder / "tokenizer_config.json") if f.is_file()),
                folder)


def check_chat_templates(template: str | dict | list | None, origin: Callable[[str], Path]) -> None:
    """Each chat template the tokenizer carries (one, or transformers' named ones) parses in the environment serving
    renders it with; one that does not is refused naming it, its file (origin(name)) and the line, where serving
    would fail every chat request."""
    import jinja2

    if isinstance(template, list):  # the saved form of named templates: [{name, template}]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    named = {"default": template} if isinstance(template, str) else dict(template or {})
    for name, text in named.items():
        if not isinstance(text, str):
            raise ModelSourceError(f"{origin(name)}: chat template {name!r} is not a string but "
                                   f"{type(text).__name__}")
        fails = "every chat request" if name == "default" else f"every chat request that picks {name!r}"
        try:
            compile_template(text)
        except jinja2.TemplateSyntaxError as e:
            raise ModelSourceError(f"{origin(name)}: chat template {name!r}, line {e.lineno}: {e.message} ({fails} "
                                   "would fail; fix the template)") from None
        except (RecursionError, MemoryError):  # jinja's parser recurses with the nesting (transformers fails alike)
            raise ModelSourceError(f"{origin(name)}: chat template {name!r} nests too deeply to parse ({fails} "
                                   "would fail; fix the template)") from None


def _needs_sentencepiece(copied: list[str]) -> bool:
    return ("tokenizer.model" in copied and not {"tokenizer.json", "vocab.json", "vocab.txt"} & set(copied)
            and importlib.util.find_spec("sentencepiece") is None)


def copy_tokenizer_files(source: ModelSource, out_dir: Path, vocab_size: int) -> list[str]:
    """Copy the tokenizer files into `out_dir` and load them from there, exactly as serving will; refuse one that
    encodes nothing, and say so where it has ids past the model's `vocab_size` embedding rows."""
    from transformers import AutoTokenizer

    copied = []
    for f in iter_tokenizer_files(source):
        shutil.copyfile(f, out_dir / f.name)
        copied.append(f.name)
    copied = _fold_named_templates(source, out_dir, copied)
    if not {"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt"} & set(copied):
        raise ModelSourceError(f"{source.tokenizer_dir}: no tokenizer files (tokenizer.json or tokenizer.model)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    except Exception as e:  # tokenizers and transformers raise many types for a bad file; all mean "cannot serve"
        files = ", ".join(str(source.tokenizer_dir / f) for f in copied)
        if _needs_sentencepiece(copied):  # transformers then falls back to tiktoken and names that instead
            raise ModelSourceError(
                f"{source.tokenizer_dir / 'tokenizer.model'}: a sentencepiece tokenizer with no tokenizer.json; "
                "transformers converts it only with the sentencepiece package installed (pip install sentencepiece), "
                "or give the folder the tokenizer.json a save_pretrained of the tokenizer writes") from None
        raise ModelSourceError(f"tokenizer in {files} does not load: {type(e).__name__}: {e}") from None
    where = source.path if source.is_gguf else ", ".join(str(source.tokenizer_dir / f) for f in copied)
    past = sorted((i, t) for t, i in tokenizer.get_vocab().items() if i >= vocab_size)
    if past:  # not refused: transformers adds tokens of its own to some (gemma's '<mask>' from a GGUF), unused in text
        logger.warning("tokenizer in %s has %d token(s) past the model's %d embedding rows ('vocab_size'), first %r "
                       "(id %d): prompts holding them are refused", where, len(past), vocab_size, past[0][1],
                       past[0][0])
    check_chat_templates(tokenizer.chat_template, lambda name: _template_origin(source, name))
    written = write_tokenizer_snapshot(tokenizer, out_dir)  # serving reads these without transformers
    if (problem := encoding_problem(tokenizer, out_dir, written)) is not None:
        raise ModelSourceError(f"tokenizer in {where} loads but cannot encode {SAMPLE_TEXT!r} ({problem})")
    return copied + written
