"""The build directory's format: its file names, format versions, the manifest's digest, and the kernel entries and
error every reader of a build shares, and the reading of its JSON files (torch-free)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

# 2: the manifest records its own digest (MANIFEST_DIGEST_KEY); 3: each kernel entry names its op and language;
# 4: the spec carries the new families' fields (model kind, q/k norm, norm offset, partial rotary, MoE, windows)
# and an encoder's pooling recipe; 5: the LoRA adapters packed into the build (key 'loras', a list, maybe empty);
# 6: quantised weights (key 'quantization': the method, and each packed tensor's scheme and group size) and the
# tensor-parallel layout (key 'tensor_parallel_size'; 'weights' lists one weights file per rank). Since added,
# without a new format (older builds load as they are): 'quantization.lm_head', whether the LM head is packed;
# 7: packed weights' scales and mins may be fp16 (models/quant.py), and the cpu kernels' packed-linear interface
# carries their dtype, so a format-6 build's compiled kernels would misread what this runtime passes them;
# 8: the cpu decode step takes up to 64 sequences and says how many (pllm_decode_step_max_batch), which this runtime
# asks a build's step library (a format-7 library lacks the question); 9: a packed tensor may be 'int4_sym' (GGUF's
# Q4_0 kept, --quantization int4_sym), which a format-8 runtime cannot read. A build holding none is still written as
# format 8 (format_version_for): its kernels' interfaces are format 8's, so older runtimes load it as before, and this
# runtime passes a format-8 build's kernels the values they always took (LOADABLE_FORMATS); 10: a packed tensor may be
# 'int6' (`--lm-head int6`), whose code the cpu kernels of format 9 do not know. Written only where a build holds one.
FORMAT_VERSION = 10
LOADABLE_FORMATS = (8, 9, 10)
# builds of these formats may be replaced by a new compile: 1 lists its files, 2 and later also carry their digest,
# which must then match
REPLACEABLE_FORMATS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
MANIFEST = "manifest.json"
MANIFEST_DIGEST_KEY = "manifest_sha256"
WEIGHTS_FILE = "model.safetensors"  # a single-rank build's weights
KERNELS_DIR = "kernels"
GENERATION_CONFIG = "generation_config.json"
# the tokenizer as transformers resolved it at compile time (compiler/tokenizer_snapshot.py), listed among the
# tokenizer files when the tokenizer has a `tokenizers` backend; serving reads them without transformers. Format 2: the
# facts transformers keeps beside the backend in TOKENIZER_SNAPSHOT, the backend itself in TOKENIZER_BACKEND as the
# tokenizers library writes it, which it reads back as it is. Format 1 (builds before it, under the older name) held
# the backend inside the snapshot as a JSON object, parsed into Python and written back out as text at every start:
# ~0.13 s holding the interpreter's lock beside torch's import. The new names keep older runtimes, which know only
# format 1, loading new builds: they find no snapshot of theirs and read the tokenizer files through transformers.
TOKENIZER_SNAPSHOT = "pllm_tokenizer_v2.json"
TOKENIZER_BACKEND = "pllm_tokenizer_backend.json"
TOKENIZER_SNAPSHOT_FORMAT = 2
TOKENIZER_SNAPSHOTS = {TOKENIZER_SNAPSHOT: TOKENIZER_SNAPSHOT_FORMAT, "pllm_tokenizer.json": 1}  # file -> format
LORA_DIR = "lora"  # lora/<name>/ holds a packed adapter's adapter_config.json and adapter_model.safetensors
LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")
# a quantised runtime tensor `name` is stored as name.codes, name.scales and (int4, not int4_sym) name.mins:
# models/quant.py's layout
QUANT_PARTS = ("codes", "scales", "mins")
QUANT_SCHEMES = ("int8", "int4", "int4_sym", "int6")  # models.quant.QuantScheme's values (this module stays torch-free)
HEAD_ONLY_SCHEMES = ("int6",)  # schemes a build keeps for its LM head alone (the decode step reads no INT6 layer)
QUANT_METHODS = ("int8", "int4", "int4_sym", "gguf")  # compiler.quantize.Quantization's values
LM_HEAD_KINDS = ("float", "int8", "int6")  # compiler.lm_head.LmHead's values; a packed one is stored as LM_HEAD
LM_HEAD = "lm_head"


def format_version_for(quantized: dict[str, dict]) -> int:
    """The format a build is written in: FORMAT_VERSION where a packed tensor (name -> {"scheme", "group_size"})
    needs it, else the oldest format that holds the build, so older runtimes still load it."""
    schemes = {e["scheme"] for e in quantized.values()}
    return FORMAT_VERSION if "int6" in schemes else 9 if "int4_sym" in schemes else LOADABLE_FORMATS[0]


def weights_file(rank: int, size: int) -> str:
    """The weights file rank `rank` of a build for `size` ranks reads: its shard only."""
    return WEIGHTS_FILE if size == 1 else f"model-rank{rank}.safetensors"


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own digest, so an edit to any key or value shows."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Language(Enum):
    """How a rendered kernel reaches the runtime: Triton is imported (JIT or interpreted), C++ is compiled at build."""

    TRITON = "triton"
    CPP = "c++"

    @property
    def suffix(self) -> str:
        return "py" if self is Language.TRITON else "cpp"


@dataclass(frozen=True)
class KernelEntry:
    """One kernel the build was rendered with: the backends bind it by `op`, the operation it implements."""

    name: str  # "cpu_rms_norm": the file's stem, and the key of its library under cpu_kernels
    op: str  # "rms_norm"
    language: Language
    file: str  # relative to kernels/


class BuildDirError(ValueError):
    """The build directory is missing, incomplete or tampered with; the message names the file."""


def json_object(f: Path, data: bytes) -> dict:
    """A build file's bytes as a JSON object; BuildDirError naming the file otherwise."""
    try:
        value = json.loads(data)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise BuildDirError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise BuildDirError(f"{f}: must be a JSON object, got {type(value).__name__}")
    return value
