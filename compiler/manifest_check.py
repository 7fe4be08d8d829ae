"""The checked reading of manifest.json: its format version and digest, then every key's type and every reference the
loader relies on, so a malformed or tampered manifest is named, never a KeyError (torch-free)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path, PurePosixPath
from typing import Any

from pllm.compiler.manifest_format import (
    HEAD_ONLY_SCHEMES,
    KERNELS_DIR,
    LM_HEAD,
    LM_HEAD_KINDS,
    LOADABLE_FORMATS,
    LORA_DIR,
    LORA_FILES,
    MANIFEST,
    MANIFEST_DIGEST_KEY,
    QUANT_METHODS,
    QUANT_SCHEMES,
    TOKENIZER_BACKEND,
    TOKENIZER_SNAPSHOT,
    BuildDirError,
    Language,
    json_object,
    manifest_digest,
    weights_file,
)
from pllm.models.pooling import Pooling, PoolingConfig
from pllm.models.spec import DTYPES, ModelKind, ModelSpec, MoeSpec, RopeScaling

_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_manifest(manifest_file: Path) -> dict:
    """The manifest as written by pllm-compile: format version first (old builds: rebuild), then its own digest."""
    manifest = json_object(manifest_file, manifest_file.read_bytes())
    version = manifest.get("format_version")
    if type(version) is not int or version not in LOADABLE_FORMATS:
        raise BuildDirError(f"{manifest_file}: format_version {version!r} is not one this pllm loads "
                            f"({', '.join(map(str, LOADABLE_FORMATS))}); rebuild it")
    if manifest.get(MANIFEST_DIGEST_KEY) != manifest_digest(manifest):
        raise BuildDirError(f"{manifest_file}: modified since it was built (its digest does not match)")
    return manifest


def _fail(manifest_file: Path, key: str, must: str, value: Any) -> BuildDirError:
    return BuildDirError(f"{manifest_file}: key '{key}' must be {must}, got {value!r}")


def check_manifest(m: dict, manifest_file: Path) -> None:
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
    if (TOKENIZER_SNAPSHOT in m["tokenizer_files"]) != (TOKENIZER_BACKEND in m["tokenizer_files"]):
        raise _fail(manifest_file, "tokenizer_files", f"{TOKENIZER_SNAPSHOT} and {TOKENIZER_BACKEND} together or "
                    "neither", m["tokenizer_files"])


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
    packed = q["tensors"].get(LM_HEAD) if isinstance(q["tensors"].get(LM_HEAD), dict) else None
    if head not in LM_HEAD_KINDS or (head != "float") != (packed is not None) or \
            (packed is not None and packed.get("scheme") != head):
        raise _fail(manifest_file, "quantization.lm_head", f"one of {', '.join(LM_HEAD_KINDS)}, packed (int8, int6) "
                    f"exactly when '{LM_HEAD}' is a packed tensor of that scheme", head)
    for name, entry in q["tensors"].items():
        group = entry.get("group_size") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or set(entry) != {"scheme", "group_size"} or entry["scheme"] not in \
                QUANT_SCHEMES or type(group) is not int or group <= 0:
            raise _fail(manifest_file, f"quantization.tensors.{name}", "a scheme and a positive group size", entry)
        if entry["scheme"] in HEAD_ONLY_SCHEMES and name != LM_HEAD:  # the compiler packs only the head so
            raise _fail(manifest_file, f"quantization.tensors.{name}", f"a scheme other than {entry['scheme']} "
                        f"(kept for '{LM_HEAD}' only)", entry)


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


def spec_from_manifest(d: dict, manifest_file: Path) -> ModelSpec:
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


def pooling_from_manifest(d: Any, spec: ModelSpec, manifest_file: Path) -> PoolingConfig | None:
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
