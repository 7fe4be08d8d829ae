"""A .gguf file read through transformers from the file alone, refusing what transformers cannot read faithfully.

transformers' GGUF reader takes a folder and a file name, and prefers what the folder holds beside the file (a
tokenizer.json there wins over the file's own vocabulary, chat template and special tokens): it is given a private
folder holding only a link to the file. It fills a tensor it cannot place with the model's random initialisation
and says so only in a log, and it sizes a model from defaults where the file's settings have no mapping (qwen3's
head_dim, qwen3_moe's expert width): every such tensor is refused here, by name. It reads qwen3_moe's experts fused
(experts.gate_up_proj, experts.down_proj), which are split into the per-expert names a saved folder holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pllm.compiler.gguf_reading import parsed_once
from pllm.compiler.source import ModelSourceError, layer_mismatch

# GGUF general.architecture -> the model type transformers reads it as, for the families pllm has
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",
                 "phi3": "phi3", "gemma3": "gemma3_text"}
MOE_ARCHITECTURES = ("qwen3moe",)  # the others read as dense models, whatever experts the file holds
KEPT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K")  # the types --quantization gguf keeps (compiler/gguf_blocks.py)
SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
# a file's setting that transformers' reader does not read for the architecture -> the config key it defaults instead
SIZE_SETTINGS = (("attention.key_length", "head_dim"), ("expert_feed_forward_length", "moe_intermediate_size"),
                 ("feed_forward_length", "intermediate_size"), ("embedding_length", "hidden_size"))
FUSED_EXPERTS = re.compile(r"(model\.layers\.\d+\.mlp\.experts\.)(gate_up_proj|down_proj)")


def field_value(reader: Any, key: str) -> Any:
    """A metadata value of the file (a string, a number), or None when the file lacks it."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    part = field.parts[field.data[0]]
    return bytes(part).decode("utf-8", "replace") if field.types and field.types[0].name == "STRING" else part[0].item()


BLOCK_NAME = re.compile(r"blk\.(\d+)\.")


def file_key_names(reader: Any, arch: str, model_type: str | None) -> dict[str, str]:
    """Config key -> the GGUF key transformers read it from in this file ('max_position_embeddings' ->
    'llama.context_length'), from transformers' own table of them; only keys the file holds (a value transformers
    took from elsewhere, as the vocabulary's size from the token list, is not named as the file's)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    table = GGUF_CONFIG_MAPPING.get(model_type) or GGUF_CONFIG_MAPPING.get(arch) or {}
    return {hf: f"{arch}.{key}" for key, hf in table.items() if hf is not None and f"{arch}.{key}" in reader.fields}


@dataclass
class GgufRead:
    """What transformers reads of a GGUF file: its config, tokenizer, tensors by HF name and generation config; the
    config keys as the file names them (file_key_names); its one parse, when kept for its blocks."""

    config: Any
    tokenizer: Any
    state: dict[str, torch.Tensor]
    generation_config: Any
    config_keys: dict[str, str]
    reader: Any = None


def check_layout(path: Path, reader: Any, arch: str) -> None:
    """Refuse a file whose tables contradict themselves, as llama.cpp's loader does, before transformers reads it
    (which would build the model the block count says, dropping blocks past it or allocating billions of layers,
    and read tensors wherever their offsets point, into their neighbours): the block count against the blocks the
    tensors hold; sizes that are positive; special token ids within the vocabulary; each tensor's data aligned as
    the file says and clear of the next tensor's."""
    blocks = {int(m[1]) for t in reader.tensors if (m := BLOCK_NAME.match(t.name))}
    count = field_value(reader, f"{arch}.block_count")
    if blocks and (held := layer_mismatch(blocks, count, "block")) is not None:
        raise ModelSourceError(f"{path}: {arch}.block_count is {count} but the file's tensors hold {held}: a corrupt "
                               "or hand-edited file")
    for key in ("embedding_length", "feed_forward_length", "attention.head_count", "attention.head_count_kv",
                "context_length"):
        value = field_value(reader, f"{arch}.{key}")  # (a per-layer array: its first value)
        if value is not None and not (isinstance(value, int) and value > 0):
            raise ModelSourceError(f"{path}: {arch}.{key} is {value}, not a positive whole number: a corrupt or "
                                   "hand-edited file")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        for key in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id"):
            value = field_value(reader, f"tokenizer.ggml.{key}")
            if value is not None and not (isinstance(value, int) and 0 <= value < len(tokens.data)):
                raise ModelSourceError(f"{path}: tokenizer.ggml.{key} is {value}, but the file's vocabulary has "
                                       f"{len(tokens.data)} tokens: a corrupt or hand-edited file")
    alignment = int(getattr(reader, "alignment", 32))
    tensors = sorted(reader.tensors, key=lambda t: t.data_offset)
    for t in tensors:
        if (t.data_offset - reader.data_offset) % alignment:
            raise ModelSourceError(f"{path}: tensor '{t.name}' starts at byte {t.data_offset - reader.data_offset} "
                                   f"of the data, not a multiple of the file's alignment ({alignment}): a corrupt "
                                   "or hand-edited file")
    for t, after in zip(tensors, tensors[1:]):
        if t.data_offset + t.n_bytes > after.data_offset:
            raise ModelSourceError(f"{path}: tensor '{t.name}' ({t.n_bytes} bytes of {t.tensor_type.name}) runs into "
                                   f"tensor '{after.name}': the tensor table is inconsistent (a corrupt or "
                                   "hand-edited file)")


def check_file(path: Path, reader: Any, keeps_blocks: bool) -> str:
    """Refuse, before transformers reads it, a file pllm cannot build; its architecture."""
    if (count := field_value(reader, "split.count")) is not None and count > 1:
        raise ModelSourceError(f"{path}: one shard of a split GGUF ({count} files; transformers reads one file): "
                               "merge them first (llama-gguf-split --merge)")
    arch = field_value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelSourceError(f"{path}: GGUF architecture {arch!r} is not supported (pllm reads GGUF files of "
                               f"{', '.join(ARCHITECTURES)})")
    check_layout(path, reader, arch)
    experts = field_value(reader, f"{arch}.expert_count")
    if experts and arch not in MOE_ARCHITECTURES:
        raise ModelSourceError(f"{path}: a mixture of {experts} experts in a {arch!r} GGUF (llama.cpp's mixtral), "
                               f"which transformers reads as a dense {ARCHITECTURES[arch]} without its experts; "
                               "compile the Hugging Face folder instead")
    if keeps_blocks:
        types = {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) >= 2}
        if not types & set(KEPT_TYPES):
            raise ModelSourceError(f"{path}: --quantization gguf keeps {'/'.join(KEPT_TYPES)} blocks, but the file's "
                                   f"layer matrices are {', '.join(sorted(types)) or 'absent'}; use --quantization "
                                   "int8, int4 or int4_sym, or none")
    return arch


def check_loading(path: Path, arch: str, reader: Any, config: Any, info: dict) -> None:
    """Refuse the tensors transformers left at their random initialisation or could not fit, naming them."""
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        name, in_file, in_model = mismatched[0]
        why = ""
        for key, attr in SIZE_SETTINGS:
            stored, built = field_value(reader, f"{arch}.{key}"), getattr(config, attr, None)
            if stored is not None and built is not None and stored != built:
                why = (f": the file's {arch}.{key} is {stored} but transformers' GGUF reader builds {attr} {built} "
                       "(a default it does not take from the file)")
                break
        raise ModelSourceError(f"{path}: tensor '{name}' is {tuple(in_file)} in the file but {tuple(in_model)} in the "
                               f"model transformers builds ({len(mismatched)} tensors do not fit){why}")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(f"'{k}'" for k in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ModelSourceError(f"{path}: transformers' GGUF reader finds no values for {len(missing)} tensors of the "
                               f"{config.model_type} model ({shown}); refusing to build them from random values")


def split_experts(path: Path, state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """transformers' fused expert tensors ([E, 2I, H] gate rows first, [E, H, I]) as the per-expert tensors of a saved
    folder (experts.N.gate_proj.weight [I, H], up_proj [I, H], down_proj [H, I])."""
    out = {}
    for name, tensor in state.items():
        m = FUSED_EXPERTS.fullmatch(name)
        if m is None:
            out[name] = tensor
            continue
        n, inter, hidden = config.num_experts, config.moe_intermediate_size, config.hidden_size
        gate_up = m[2] == "gate_up_proj"
        expected = (n, 2 * inter, hidden) if gate_up else (n, hidden, inter)
        if tuple(tensor.shape) != expected:
            raise ModelSourceError(f"{path}: tensor '{name}' is {tuple(tensor.shape)}, expected {expected} from "
                                   "num_experts, moe_intermediate_size and hidden_size")
        for e in range(n):
            base = f"{m[1]}{e}."
            if gate_up:
                out[base + "gate_proj.weight"] = tensor[e, :inter].contiguous()
                out[base + "up_proj.weight"] = tensor[e, inter:].contiguous()
            else:
                out[base + "down_proj.weight"] = tensor[e].contiguous()
    return out


class _HeldReport(logging.Filter):
    """transformers' LOAD REPORT (a table of the tensors it could not load) held back rather than printed."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self._showing = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self._showing or "LOAD REPORT" not in record.getMessage():
            return True
        self.records.append(record)
        return False

    def show(self) -> None:
        """Print what was held, as transformers would have."""
        records, self.records = self.records, []
        self._showing = True
        try:
            for record in records:
                logging.getLogger(record.name).handle(record)
        finally:
            self._showing = False


@contextlib.contextmanager
def held_load_report():
    """transformers prints a multi-line LOAD REPORT for tensors it leaves at their initialisation; pllm refuses those
    in one line of its own (check_loading), so the report is held while the file loads and shown only where pllm
    says nothing of it (a load that fails in transformers, or one pllm accepts)."""
    logger = logging.getLogger("transformers.modeling_utils")
    held = _HeldReport()
    logger.addFilter(held)
    try:
        yield held
    finally:
        logger.removeFilter(held)


def read_gguf(path: Path, scratch: Path, keeps_blocks: bool) -> GgufRead:
    """The file's config, tokenizer, tensors by HF name and generation config, read by transformers from a folder
    under `scratch` holding only a link to it; and its one parse when keeps_blocks (for its kept blocks)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if m := SPLIT_NAME.search(path.name):
        if int(m[2]) > 1:
            raise ModelSourceError(f"{path}: shard {int(m[1])} of a split GGUF ({int(m[2])} files; transformers reads "
                                   "one file): merge them first (llama-gguf-split --merge)")
    alone = scratch / "gguf"
    alone.mkdir()
    (alone / path.name).symlink_to(path.resolve())
    folder, file = str(alone), path.name
    try:
        with parsed_once() as parsed:  # transformers opens the file four times: parsed once
            try:
                reader = parsed.reader(path)
            except Exception as e:
                raise ModelSourceError(f"{path}: cannot read GGUF file: {e}") from None
            arch = check_file(path, reader, keeps_blocks)
            with held_load_report() as report:
                try:
                    config = AutoConfig.from_pretrained(folder, gguf_file=file)
                    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
                    model, info = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32,
                                                                       output_loading_info=True,
                                                                       ignore_mismatched_sizes=True)
                except Exception as e:
                    report.show()  # its error may point at the report
                    raise ModelSourceError(f"{path}: cannot read GGUF file: {e}") from None
                check_loading(path, arch, reader, config, info)  # a refusal here says what the report would
                report.show()
    finally:
        shutil.rmtree(alone, ignore_errors=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if any(FUSED_EXPERTS.fullmatch(k) for k in state):
        state = split_experts(path, state, config)
    return GgufRead(config, tokenizer, state, model.generation_config,
                    file_key_names(reader, arch, getattr(config, "model_type", None)), reader if keeps_blocks else None)


def keep_saved_tokenizer_faithful(tokenizer: Any, folder: Path) -> None:
    """The tokenizer transformers read from the file, saved into `folder`, reloads there as its class (a gemma3
    file's GemmaTokenizer) which rebuilds the pipeline from the vocabulary: where that one encodes a sample otherwise
    than the file's (a GPT-2 BPE vocabulary: no unknown token, no byte-level split), the saved pipeline is loaded as
    it is (tokenizer_class TokenizersBackend) when that one encodes as the file's; else compile's encoding check
    refuses it."""
    from transformers import AutoTokenizer

    from pllm.compiler.tokenizer_snapshot import SAMPLE_TEXT

    def encodes(tok: Any) -> Any:
        try:
            return tok(SAMPLE_TEXT)["input_ids"]
        except Exception as e:  # tokenizers raises a bare Exception for an unknown token missing from the vocabulary
            return e

    expected, config_file = encodes(tokenizer), folder / "tokenizer_config.json"
    if isinstance(expected, Exception) or not config_file.is_file() or encodes(
            AutoTokenizer.from_pretrained(str(folder))) == expected:
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    saved = config.get("tokenizer_class")
    config["tokenizer_class"] = "TokenizersBackend"
    config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    if encodes(AutoTokenizer.from_pretrained(str(folder))) != expected:
        config["tokenizer_class"] = saved
        config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
