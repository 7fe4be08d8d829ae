"""The build directory's manifest: file names, format, checksums, and the checked reading of it (torch-free)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import mmap
import os
import re
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any

from pllm.compiler import verify_stamp
from pllm.compiler.verify_stamp import FileIdentity
from pllm.models.parallel_layout import rank_spec
from pllm.models.pooling import Pooling, PoolingConfig
from pllm.models.spec import DTYPES, ModelKind, ModelSpec, MoeSpec, RopeScaling

logger = logging.getLogger("pllm")

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
# runtime passes a format-8 build's kernels the values they always took (LOADABLE_FORMATS)
FORMAT_VERSION = 9
LOADABLE_FORMATS = (8, 9)
# builds of these formats may be replaced by a new compile: 1 lists its files, 2 and later also carry their digest,
# which must then match
REPLACEABLE_FORMATS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
MANIFEST = "manifest.json"
MANIFEST_DIGEST_KEY = "manifest_sha256"
WEIGHTS_FILE = "model.safetensors"  # a single-rank build's weights
KERNELS_DIR = "kernels"
GENERATION_CONFIG = "generation_config.json"
# the tokenizer as transformers resolved it at compile time (compiler/tokenizer_snapshot.py), listed among the
# tokenizer files when the tokenizer has a `tokenizers` backend; serving reads it without transformers. Format 2: the
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
QUANT_SCHEMES = ("int8", "int4", "int4_sym")  # models.quant.QuantScheme's values (this module stays torch-free)
QUANT_METHODS = ("int8", "int4", "int4_sym", "gguf")  # compiler.quantize.Quantization's values
LM_HEAD_KINDS = ("float", "int8")  # compiler.lm_head.LmHead's values; a quantised build's head, stored as LM_HEAD
LM_HEAD = "lm_head"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def format_version_for(quantized: dict[str, dict]) -> int:
    """The format a build is written in: FORMAT_VERSION where a packed tensor (name -> {"scheme", "group_size"})
    needs it, else the oldest format that holds the build, so older runtimes still load it."""
    return FORMAT_VERSION if any(e["scheme"] == "int4_sym" for e in quantized.values()) else LOADABLE_FORMATS[0]


def weights_file(rank: int, size: int) -> str:
    """The weights file rank `rank` of a build for `size` ranks reads: its shard only."""
    return WEIGHTS_FILE if size == 1 else f"model-rank{rank}.safetensors"


HASH_SPAN = 1 << 30  # bytes of a mapped file hashed per call


def sha256_file(path: Path) -> str:
    """The file's sha256, hashed from a read-only mapping in spans of HASH_SPAN: hashlib releases the GIL for each
    call, and the page faults happen inside it, so a thread hashing beside Python work (pllm-serve's imports) takes
    the GIL back once per span, not once per buffer read. Nothing is copied; pages the kernel may drop again."""
    return sha256_and_identity(path)[0]


def sha256_and_identity(path: Path) -> tuple[str, FileIdentity]:
    """sha256_file's digest, and the identity (verify_stamp) of the very file hashed, taken as it was opened."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        identity = FileIdentity.from_stat(os.fstat(f.fileno()))
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # an empty file (nothing to map), or one that cannot be mapped: read it
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return h.hexdigest(), identity
        with mapped, memoryview(mapped) as view:
            for start in range(0, len(view), HASH_SPAN):
                h.update(view[start:start + HASH_SPAN])
    return h.hexdigest(), identity


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


@dataclass(frozen=True)
class BuildManifest:
    """A build directory whose manifest was read and checked: its spec, dtype and block size, and verified reads
    of the files it lists."""

    path: Path
    manifest: dict
    spec: ModelSpec
    dtype: str
    block_size: int
    kernel_dir: Path
    pooling: PoolingConfig | None = None  # an encoder build's embedding recipe (its manifest key 'pooling')
    loras: tuple[tuple[str, str], ...] = ()  # packed LoRA adapters: (name, folder relative to the build)
    # the ranks the build was split for (compiler --tensor-parallel-size): its spec is the whole model's, its
    # kernels were rendered for one rank's heads (models.tensor_parallel.rank_spec), weight_files[r] is rank r's
    tensor_parallel_size: int = 1
    weight_files: tuple[str, ...] = (WEIGHTS_FILE,)

    @property
    def rank_spec(self) -> ModelSpec:
        """The shape one rank computes, what the kernels were rendered for: the spec itself on a single rank."""
        return rank_spec(self.spec, self.tensor_parallel_size)

    def read_bytes(self, rel: str) -> bytes:
        """A listed file's bytes, checked against the manifest: what is used is exactly what was verified."""
        digest = self.manifest["files"].get(rel)
        if digest is None:
            raise BuildDirError(f"{self.path / rel}: not listed in {self.path / MANIFEST} (only listed files are read)")
        f = _listed_file(self.path, rel)
        try:
            data = f.read_bytes()
        except OSError as e:
            raise BuildDirError(f"{f}: cannot be read ({e.strerror or e})") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise BuildDirError(_modified(self.path / rel))
        return data

    def read_kernel(self, name: str) -> bytes | None:
        """kernels/<name>, verified; None when the build lists no such file."""
        rel = f"{KERNELS_DIR}/{name}"
        return self.read_bytes(rel) if rel in self.manifest["files"] else None

    def kernels(self, language: Language) -> tuple[KernelEntry, ...]:
        """The build's kernels in one language, in plan order."""
        entries = (KernelEntry(name, e["op"], Language(e["language"]), e["file"])
                   for name, e in self.manifest["kernels"]["kernels"].items())
        return tuple(e for e in entries if e.language is language)

    def read_json(self, rel: str) -> dict:
        return json_object(self.path / rel, self.read_bytes(rel))


def json_object(f: Path, data: bytes) -> dict:
    try:
        value = json.loads(data)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise BuildDirError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise BuildDirError(f"{f}: must be a JSON object, got {type(value).__name__}")
    return value


def open_build(build_dir: str | Path, verify: bool = True) -> BuildManifest:
    path = Path(build_dir)
    manifest_file = path / MANIFEST
    if not path.is_dir():
        raise BuildDirError(f"{path}: build directory not found (create one with pllm-compile)")
    if not manifest_file.is_file():
        raise BuildDirError(f"{manifest_file}: missing; {path} is not a complete pllm build")
    manifest = _read_manifest(manifest_file)
    _check_manifest(manifest, manifest_file)
    spec = _spec_from_manifest(manifest["spec"], manifest_file)
    pooling = _pooling_from_manifest(manifest.get("pooling"), spec, manifest_file)
    loras = tuple((e["name"], f"{LORA_DIR}/{e['name']}") for e in manifest["loras"])
    build = BuildManifest(path, manifest, spec, manifest["dtype"], manifest["block_size"], path / KERNELS_DIR,
                          pooling, loras, manifest["tensor_parallel_size"], tuple(manifest["weights"]))
    if verify:
        verify_files(build)
    return build


def verify_files(build: BuildManifest, rank: int = 0) -> None:
    """Every listed file rank `rank` reads against its sha256 (the other ranks' weight shards are theirs to check);
    raises BuildDirError naming the first that differs. A file unchanged since it last hashed correctly here, as
    the file system identifies it, is not hashed again (verify_stamp.py says why that is safe, and when it is not
    trusted). open_build runs it unless told not to, for a caller that runs it itself (the engine: on a thread,
    beside loading the tokenizer, as hashing releases the GIL), and must then not use the build's unread files
    before it returns."""
    others = {f for r, f in enumerate(build.weight_files) if r != rank}
    listed = {rel: _listed_file(build.path, rel) for rel in build.manifest["files"] if rel not in others}
    taken_ns = time.time_ns()  # before any identity: a file changed since (or in the same tick) is not stamped
    identities: dict[str, FileIdentity] = {}
    for rel, f in listed.items():
        try:
            identities[rel] = FileIdentity.of(f)
        except OSError as e:
            raise BuildDirError(f"{f}: cannot be read ({e.strerror or e})") from None
    stamp = verify_stamp.stamp_for(build.path, manifest_digest(build.manifest), rank)
    hashed_before = verify_stamp.unchanged(stamp, identities)
    for rel, f in listed.items():
        if rel in hashed_before:
            continue
        try:  # the identity stamped is the hashed file's own, taken as it was opened (a link retargeted since the
            # identities above were taken is then stamped as what it now leads to)
            digest, identities[rel] = sha256_and_identity(f)  # streamed: weights may exceed spare memory
        except OSError as e:
            raise BuildDirError(f"{f}: cannot be read ({e.strerror or e})") from None
        if digest != build.manifest["files"][rel]:
            raise BuildDirError(_modified(f))
    verify_stamp.record(stamp, identities, taken_ns)
    if hashed_before:
        logger.info("%s: %d of %d files hashed against the manifest; %d unchanged since they last matched it",
                    build.path, len(listed) - len(hashed_before), len(listed), len(hashed_before))


def _modified(f: Path) -> str:
    return f"{f}: sha256 does not match the manifest (modified since it was built)"


def _listed_file(root: Path, rel: str) -> Path:
    """A file the manifest lists, which must be a regular file inside the build."""
    f = root / rel
    if not f.exists():
        raise BuildDirError(f"{f}: listed in the manifest but missing")
    if not f.resolve().is_relative_to(root.resolve()):  # a link leading out of the build
        raise BuildDirError(f"{f}: leads outside the build directory {root}")
    if not f.is_file():
        raise BuildDirError(f"{f}: listed in the manifest but not a regular file")
    return f


def _read_manifest(manifest_file: Path) -> dict:
    """The manifest as written by pllm-compile: format version first (old builds: rebuild), then its own digest."""
    try:
        manifest = json.loads(manifest_file.read_bytes())
    except ValueError as e:
        raise BuildDirError(f"{manifest_file}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BuildDirError(f"{manifest_file}: must be a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if type(version) is not int or version not in LOADABLE_FORMATS:
        raise BuildDirError(f"{manifest_file}: format_version {version!r} is not one this pllm loads "
                            f"({', '.join(map(str, LOADABLE_FORMATS))}); rebuild it")
    if manifest.get(MANIFEST_DIGEST_KEY) != manifest_digest(manifest):
        raise BuildDirError(f"{manifest_file}: modified since it was built (its digest does not match)")
    return manifest


def _fail(manifest_file: Path, key: str, must: str, value: Any) -> BuildDirError:
    return BuildDirError(f"{manifest_file}: key '{key}' must be {must}, got {value!r}")


def _check_manifest(m: dict, manifest_file: Path) -> None:
    """The types and references the loader relies on, so a malformed manifest is named, never a KeyError."""
    kinds = {dict: "a JSON object", list: "a JSON list", str: "a string"}
    for key, kind in [("spec", dict), ("kernels", dict), ("cpu_kernels", dict), ("compiled_kernels", dict),
                      ("files", dict), ("tokenizer_files", list), ("weights", list), ("source", str),
                      ("loras", list), ("quantization", dict)]:
        if not isinstance(m.get(key), kind):
            raise _fail(manifest_file, key, kinds[kind], m.get(key))
    if m.get("dtype") not in DTYPES:
        raise _fail(manifest_file, "dtype", f"one of {', '.join(DTYPES)}", m.get("dtype"))
    block_size = m.get("block_size")
    if type(block_size) is not int or block_size <= 0:
        raise _fail(manifest_file, "block_size", "a positive integer", block_size)
    for key in ("dtype", "block_size"):  # the kernels were rendered for these: they must agree
        if m["kernels"].get(key) != m[key]:
            raise _fail(manifest_file, f"kernels.{key}", f"{m[key]!r} like '{key}'", m["kernels"].get(key))
    _check_kernel_entries(m["kernels"].get("kernels"), manifest_file)
    files = m["files"]
    if not files:
        raise _fail(manifest_file, "files", "a non-empty object", files)
    for rel, digest in files.items():
        parts = PurePosixPath(rel).parts
        if rel != PurePosixPath(rel).as_posix() or not parts or parts[0] == "/" or ".." in parts or "\\" in rel \
                or rel == MANIFEST:
            raise _fail(manifest_file, "files", "relative paths inside the build", rel)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise _fail(manifest_file, f"files.{rel}", "a sha256 hex digest", digest)
    size = m.get("tensor_parallel_size")
    if type(size) is not int or size < 1:
        raise _fail(manifest_file, "tensor_parallel_size", "a positive integer", size)
    expected = [weights_file(r, size) for r in range(size)]
    if m["weights"] != expected:
        raise _fail(manifest_file, "weights", f"{expected} (one file per rank)", m["weights"])
    listed = [("weights", f) for f in m["weights"]]
    listed += [("tokenizer_files", name) for name in m["tokenizer_files"]]
    libraries = m["cpu_kernels"].get("libraries", {})
    if not isinstance(libraries, dict):
        raise _fail(manifest_file, "cpu_kernels.libraries", "a JSON object", libraries)
    listed += [(f"cpu_kernels.libraries.{k}", f"{KERNELS_DIR}/{v}") for k, v in libraries.items()]
    names = set()
    for i, entry in enumerate(m["loras"]):
        if not isinstance(entry, dict) or set(entry) != {"name", "rank"} or not isinstance(entry["name"], str) \
                or type(entry["rank"]) is not int or entry["name"] in names or "/" in entry["name"] \
                or entry["name"] in ("", ".", ".."):
            raise _fail(manifest_file, f"loras[{i}]", "an object with a distinct name and its rank", entry)
        names.add(entry["name"])
        listed += [(f"loras[{i}]", f"{LORA_DIR}/{entry['name']}/{f}") for f in LORA_FILES]
    for key, rel in listed:
        if not isinstance(rel, str) or rel not in files:
            raise _fail(manifest_file, key, "a file listed under 'files'", rel)
    _check_quantization(m["quantization"], manifest_file)
    if any("/" in name for name in m["tokenizer_files"]):  # copied by name into a private folder to load
        raise _fail(manifest_file, "tokenizer_files", "file names in the build's top folder", m["tokenizer_files"])


def _check_quantization(q: dict, manifest_file: Path) -> None:
    """{} for a float build; else {"method": ..., "tensors": {name: {"scheme", "group_size"}}, "lm_head": ...}, where
    lm_head says whether the LM head is among the packed tensors (absent in builds from before --lm-head, whose head
    is float)."""
    if not q:
        return
    if q.get("method") not in QUANT_METHODS or not isinstance(q.get("tensors"), dict) or not {"method", "tensors"} \
            <= set(q) <= {"method", "tensors", "lm_head"}:
        raise _fail(manifest_file, "quantization", f"an object with a method ({', '.join(QUANT_METHODS)}) and its "
                    "tensors", q)
    head = q.get("lm_head", LM_HEAD_KINDS[0])
    if head not in LM_HEAD_KINDS or (head == "int8") != (LM_HEAD in q["tensors"]):
        raise _fail(manifest_file, "quantization.lm_head", f"one of {', '.join(LM_HEAD_KINDS)}, int8 exactly when "
                    f"'{LM_HEAD}' is a packed tensor", head)
    for name, entry in q["tensors"].items():
        group = entry.get("group_size") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or set(entry) != {"scheme", "group_size"} or entry["scheme"] not in \
                QUANT_SCHEMES or type(group) is not int or group <= 0:
            raise _fail(manifest_file, f"quantization.tensors.{name}", "a scheme and a positive group size", entry)


def _check_kernel_entries(entries: Any, manifest_file: Path) -> None:
    if not isinstance(entries, dict):
        raise _fail(manifest_file, "kernels.kernels", "a JSON object", entries)
    languages = [language.value for language in Language]
    for name, entry in entries.items():
        key = f"kernels.kernels.{name}"
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise _fail(manifest_file, key, "an object naming its file", entry)
        # builds written before kernels named their op and language lack these keys: they must be rebuilt
        if not isinstance(entry.get("op"), str):
            raise _fail(manifest_file, f"{key}.op", "the op it implements (older build: rebuild it)", entry.get("op"))
        if entry.get("language") not in languages:
            raise _fail(manifest_file, f"{key}.language", f"one of {', '.join(languages)} (or rebuild it)",
                        entry.get("language"))


_SPEC_KINDS = {
    "int": lambda v: type(v) is int,
    "float": lambda v: type(v) in (int, float),
    "bool": lambda v: type(v) is bool,
    "str": lambda v: type(v) is str,
    "int | None": lambda v: v is None or type(v) is int,
    "tuple[int, ...]": lambda v: type(v) is list and all(type(t) is int for t in v),
    "RopeScaling | None": lambda v: v is None or type(v) is dict,
    "float | None": lambda v: v is None or type(v) in (int, float),
    "MoeSpec | None": lambda v: v is None or type(v) is dict,
    "ModelKind": lambda v: v in [kind.value for kind in ModelKind],
}


def _spec_from_manifest(d: dict, manifest_file: Path) -> ModelSpec:
    fields = {f.name: f.type for f in dataclasses.fields(ModelSpec)}
    if set(d) != set(fields):
        missing, extra = sorted(set(fields) - set(d)), sorted(set(d) - set(fields))
        raise BuildDirError(f"{manifest_file}: key 'spec' has missing keys {missing} and unknown keys {extra}")
    for name, kind in fields.items():
        if not _SPEC_KINDS[kind](d[name]):
            raise _fail(manifest_file, f"spec.{name}", f"of type {kind}", d[name])
    rope_scaling = d["rope_scaling"] or {}
    unknown = set(rope_scaling) - {f.name for f in dataclasses.fields(RopeScaling)}
    if unknown:
        raise _fail(manifest_file, "spec.rope_scaling", "a RopeScaling object", rope_scaling)
    moe = d["moe"]
    if moe is not None and set(moe) != {f.name for f in dataclasses.fields(MoeSpec)}:
        raise _fail(manifest_file, "spec.moe", "a MoeSpec object", moe)
    return ModelSpec.from_dict(d)


def _pooling_from_manifest(d: Any, spec: ModelSpec, manifest_file: Path) -> PoolingConfig | None:
    """An encoder build must carry its embedding recipe; a decoder build carries none."""
    if spec.kind is not ModelKind.ENCODER:
        if d is not None:
            raise _fail(manifest_file, "pooling", "absent for a decoder build", d)
        return None
    modes = [p.value for p in Pooling]
    if not isinstance(d, dict) or set(d) != {"pooling", "normalize", "max_seq_length", "source"}:
        raise _fail(manifest_file, "pooling", "an object with pooling, normalize, max_seq_length, source", d)
    if d["pooling"] not in modes:
        raise _fail(manifest_file, "pooling.pooling", f"one of {', '.join(modes)}", d["pooling"])
    if type(d["normalize"]) is not bool:
        raise _fail(manifest_file, "pooling.normalize", "true or false", d["normalize"])
    max_len = d["max_seq_length"]
    if type(max_len) is not int or not 1 <= max_len <= spec.max_position_embeddings:
        raise _fail(manifest_file, "pooling.max_seq_length", "an integer in [1, max_position_embeddings]", max_len)
    if type(d["source"]) is not str:
        raise _fail(manifest_file, "pooling.source", "a string", d["source"])
    return PoolingConfig(Pooling(d["pooling"]), d["normalize"], max_len, d["source"])
