"""A build directory opened: the manifest read and checked (manifest_check.py), the files it lists verified against
their digests, and checked reads of them (torch-free). The build's names and format (manifest_format.py) are
re-exported here, where every reader imports them from."""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pllm.compiler import verify_stamp
from pllm.compiler.manifest_check import check_manifest, pooling_from_manifest, read_manifest, spec_from_manifest
from pllm.compiler.manifest_format import (
    FORMAT_VERSION,
    GENERATION_CONFIG,
    KERNELS_DIR,
    LM_HEAD,
    LM_HEAD_KINDS,
    LOADABLE_FORMATS,
    LORA_DIR,
    LORA_FILES,
    MANIFEST,
    MANIFEST_DIGEST_KEY,
    QUANT_METHODS,
    QUANT_PARTS,
    QUANT_SCHEMES,
    REPLACEABLE_FORMATS,
    TOKENIZER_BACKEND,
    TOKENIZER_SNAPSHOT,
    TOKENIZER_SNAPSHOT_FORMAT,
    TOKENIZER_SNAPSHOTS,
    WEIGHTS_FILE,
    BuildDirError,
    KernelEntry,
    Language,
    format_version_for,
    json_object,
    manifest_digest,
    weights_file,
)
from pllm.compiler.verify_stamp import FileIdentity
from pllm.models.parallel_layout import rank_spec
from pllm.models.pooling import PoolingConfig
from pllm.models.spec import ModelSpec

# the build's names and format, re-exported: readers import them from here
__all__ = [
    "FORMAT_VERSION", "GENERATION_CONFIG", "HASH_SPAN", "KERNELS_DIR", "LM_HEAD", "LM_HEAD_KINDS",
    "LOADABLE_FORMATS", "LORA_DIR", "LORA_FILES", "MANIFEST", "MANIFEST_DIGEST_KEY", "QUANT_METHODS",
    "QUANT_PARTS", "QUANT_SCHEMES", "REPLACEABLE_FORMATS", "TOKENIZER_BACKEND", "TOKENIZER_SNAPSHOT",
    "TOKENIZER_SNAPSHOTS", "TOKENIZER_SNAPSHOT_FORMAT", "WEIGHTS_FILE", "BuildDirError", "BuildManifest",
    "KernelEntry", "Language", "format_version_for", "json_object", "manifest_digest", "open_build",
    "sha256_and_identity", "sha256_file", "verify_files", "weights_file",
]

logger = logging.getLogger("pllm")

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


def open_build(build_dir: str | Path, verify: bool = True) -> BuildManifest:
    path = Path(build_dir)
    manifest_file = path / MANIFEST
    if not path.is_dir():
        raise BuildDirError(f"{path}: build directory not found (create one with pllm-compile)")
    if not manifest_file.is_file():
        raise BuildDirError(f"{manifest_file}: missing; {path} is not a complete pllm build")
    manifest = read_manifest(manifest_file)
    check_manifest(manifest, manifest_file)
    spec = spec_from_manifest(manifest["spec"], manifest_file)
    pooling = pooling_from_manifest(manifest.get("pooling"), spec, manifest_file)
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
