"""Prefix-affinity routing for pllm's Ray Serve replicas: requests that share a prompt prefix go to the replica that
served that prefix last, whose prefix cache holds its KV blocks; the rest go by power of two choices.

Ray Serve's HTTP proxy routes on the request head only (the body is pulled by the replica later), so the prompt is
read by pllm's ingress deployment (ray_ingress.py), which hashes it into a `ForwardedRequest.prefix` chain and calls
the engine replicas through a deployment handle whose router is `PrefixAffinityRouter` (Serve's custom request
router API: `request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter)`).

The chain hashes the prompt's text in fixed chunks, each hash covering everything before it (as the engine's block
hashes do for tokens), so equal hashes at depth i mean equal prompts up to chunk i. Text, not tokens: the ingress has
no tokenizer, and a text prefix that matches is a token prefix that matches. Ray's own PrefixCacheAffinityRouter
(ray.llm) keeps a character trie in a shared actor; this one keeps a bounded table in the router, one per ingress
replica, which each learns the same way.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict
from dataclasses import dataclass

from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from pllm.runtime.server.json_body import JSONBodyError, parse_json_body

CHUNK_CHARS = 256  # ~64 tokens of English: several KV blocks, so a matched chunk is worth its routing
MAX_CHUNKS = 256  # hash at most the first 64k characters; a longer shared prefix stays on one replica anyway
MAX_ENTRIES = 200_000  # chunk hashes remembered (LRU), ~20 MB


@dataclass(frozen=True)
class ForwardedRequest:
    """One HTTP request as the ingress hands it to an engine replica: the ASGI scope's plain fields, the whole body,
    and the prompt's prefix-hash chain the router reads."""

    method: str
    path: str
    root_path: str
    raw_path: bytes
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    http_version: str
    scheme: str
    client: tuple[str, int] | None
    body: bytes
    prefix: tuple[bytes, ...]
    avoid: tuple[str, ...] = ()  # replicas (full actor names) that answered ReplicaUnavailable for this request

    def scope(self) -> dict:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": self.http_version,
            "method": self.method,
            "scheme": self.scheme,
            "path": self.path,
            "raw_path": self.raw_path,
            "root_path": self.root_path,
            "query_string": self.query_string,
            "headers": [list(h) for h in self.headers],
            "client": self.client,
            "server": None,
            "state": {},
        }


@dataclass(frozen=True)
class ReplicaUnavailable:
    """What an engine replica yields, instead of any ASGI message, for a request it cannot serve because its engine
    is dead: nothing was sent, so the ingress tries another replica (`ForwardedRequest.avoid`)."""

    replica: str
    reason: str


def _text(content: object) -> str:
    """A message's content as text: a string, or the text parts of a list of parts (images etc. by their JSON)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] if isinstance(p, dict) and isinstance(p.get("text"), str) else json.dumps(p)
                       for p in content)  # fmt: skip
    return "" if content is None else json.dumps(content)


def prompt_text(path: str, body: bytes) -> str:
    """The text a request's prompt starts with, for routing only ("" when there is none or the body is not JSON:
    the engine replica answers that request's errors). Everything that splits the engine's prefix cache (model or
    adapter, cache_salt) or comes before the messages in a chat template (tools) leads the text."""
    try:  # pllm-serve's own strict parse: a body too deep for json.loads is refused here as there (JSONBodyError)
        req = parse_json_body(body) if body else None
    except JSONBodyError:
        return ""
    if not isinstance(req, dict):
        return ""
    head = f"{req.get('model')}\x00{req.get('cache_salt')}\x00"
    if path.endswith("/chat/completions") and isinstance(req.get("messages"), list):
        tools = json.dumps(req["tools"], sort_keys=True) if req.get("tools") else ""
        turns = "".join(
            f"\x1e{m.get('role')}\x1f{_text(m.get('content'))}" for m in req["messages"] if isinstance(m, dict)
        )
        return head + tools + turns
    if path.endswith("/completions"):
        prompt = req.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch of prompts: route on the first
        return head + (prompt if isinstance(prompt, str) else json.dumps(prompt))
    return ""


def prefix_chain(text: str, chunk_chars: int = CHUNK_CHARS, max_chunks: int = MAX_CHUNKS) -> tuple[bytes, ...]:
    """One 16-byte hash per full chunk of `text`, each over the previous hash and its chunk (a partial last chunk
    is left out, as the engine caches only full KV blocks)."""
    data = text.encode("utf-8", "surrogatepass")
    step = chunk_chars
    chain: list[bytes] = []
    parent = b""
    for start in range(0, min(len(data) // step, max_chunks) * step, step):
        parent = hashlib.blake2b(parent + data[start : start + step], digest_size=16).digest()
        chain.append(parent)
    return tuple(chain)


def _forwarded(pending_request: PendingRequest | None):
    """The request's ForwardedRequest, if it has one: by field, not isinstance, as Serve ships the router class to the
    handle's process by value (cloudpickle), with its own copy of this module's ForwardedRequest."""
    for arg in pending_request.args if pending_request is not None else ():
        if isinstance(getattr(arg, "prefix", None), tuple):
            return arg
    return None


def request_prefix(pending_request: PendingRequest | None) -> tuple[bytes, ...]:
    forwarded = _forwarded(pending_request)
    return forwarded.prefix if forwarded is not None else ()


def request_avoid(pending_request: PendingRequest | None) -> frozenset[str]:
    """The replicas this request already found with a dead engine (ReplicaUnavailable)."""
    forwarded = _forwarded(pending_request)
    return frozenset(getattr(forwarded, "avoid", ()))


class PrefixAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Ranks the replica that last served the request's longest known prefix first, unless it holds `max_imbalance`
    more requests than the least loaded replica (then a new request would wait behind a batch there, which costs
    more than recomputing the prefix); the next rank is two random replicas, of which Serve takes the one with the
    shorter queue (power of two choices). A full holder is skipped by Serve itself, falling to that rank.
    The queue lengths Serve reports stop at a replica's max_ongoing_requests, so the imbalance that counts is at most
    half of that (a larger one could never be seen). Replicas a request names in `avoid` (their engine is dead) are
    not picked for it while another is there."""

    def initialize_state(self, max_imbalance: int = 8, max_entries: int = MAX_ENTRIES) -> None:
        if max_imbalance < 1 or max_entries < 1:
            raise ValueError(f"max_imbalance ({max_imbalance}) and max_entries ({max_entries}) must be >= 1")
        self._max_imbalance = max_imbalance
        self._max_entries = max_entries
        self._owner: OrderedDict[bytes, ReplicaID] = OrderedDict()  # chunk hash -> replica that last served it

    def holder(self, prefix: tuple[bytes, ...], live: set[ReplicaID]) -> tuple[ReplicaID | None, int]:
        """The live replica that served the longest known prefix of the chain, and how many chunks matched."""
        found, depth = None, 0
        for i, h in enumerate(prefix):
            owner = self._owner.get(h)
            if owner is None:
                break
            if owner in live:
                found, depth = owner, i + 1
        return found, depth

    def max_imbalance(self, holder: RunningReplica) -> int:
        """The imbalance that passes the holder over: `max_imbalance`, but at most half the holder's
        max_ongoing_requests, the most Serve reports of its queue."""
        return max(1, min(self._max_imbalance, holder.max_ongoing_requests // 2))

    def _overloaded(self, holder: ReplicaID, candidates: list[RunningReplica]) -> bool:
        cache = self.replica_queue_len_cache
        lens = [q for q in (cache.get(r.replica_id) for r in candidates) if q is not None]
        mine = cache.get(holder)
        return mine is not None and bool(lens) and mine - min(lens) >= self.max_imbalance(self._replicas[holder])

    def _two_choices(self, pending_request: PendingRequest | None, avoid: frozenset[str]) -> list[list[RunningReplica]]:
        located = self.apply_locality_routing(pending_request=pending_request)
        ids = [i for i in located if i in self._replicas and i.to_full_id_str() not in avoid] or [
            i for i in located if i in self._replicas
        ]
        chosen = random.sample(ids, min(2, len(ids)))
        return [[self._replicas[i] for i in chosen]]

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        avoid = request_avoid(pending_request)
        if avoid:  # a retry: only the replicas it has not tried, unless there are none
            candidate_replicas = [r for r in candidate_replicas if r.replica_id.to_full_id_str() not in avoid] or (
                candidate_replicas
            )
        fallback = self._two_choices(pending_request, avoid)
        prefix = request_prefix(pending_request)
        if not prefix:
            return fallback
        holder, _ = self.holder(prefix, {r.replica_id for r in candidate_replicas})
        if holder is None or self._overloaded(holder, candidate_replicas):
            return fallback
        return [[self._replicas[holder]], *fallback]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        owner = self._owner
        for h in request_prefix(pending_request):
            owner[h] = replica_id
            owner.move_to_end(h)
        while len(owner) > self._max_entries:
            owner.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget({replica_id})

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        old = set(self._replica_id_set)
        super().update_replicas(replicas)
        self._forget(old - set(self._replica_id_set))

    def _forget(self, gone: set[ReplicaID]) -> None:
        if gone:
            self._owner = OrderedDict((h, r) for h, r in self._owner.items() if r not in gone)
