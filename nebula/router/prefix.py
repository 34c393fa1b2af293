"""Cache-aware routing: a request goes to the replica most likely to hold the
longest prefix of its prompt in its KV cache, among replicas under a load bound.

vLLM keeps the KV cache of prompts it has seen (prefix caching, in blocks of 16
tokens chained by hash); a chat's next turn repeats the whole conversation so
far, so the replica that served the last turn skips most of the prefill
(measured here: 19.5 s to the first token cold, 0.6 s warm, SmolLM2 on CPU
with a 1,500-word system prompt).

The prompt, as text (`role:content` per message), is cut at every
`chunk_chars` characters and at every message's end, and each cut is keyed by
a hash of all the text before it (`chain`): a key names a whole prefix, as
vLLM's chained block hashes do, and a conversation's next turn repeats every
key of the turn before. The index (`PrefixIndex`) maps keys to the replicas
that were sent them, learned from this router's own choices and from every
other router's (shared through Redis, `prefix_feed.py`), bounded in size and
forgetting the least recently used first. A choice (`PrefixAffinity.choose`)
starts from the deepest key of the prompt that the index knows a live replica
holds:

1. a next turn (no prompt went on past that key yet): the replicas that hold
   it, under the load bound ("cached"; among several, rendezvous hashing on the
   prompt's anchor, so every router picks the same);
2. a new conversation (its anchor, below, never seen) on a prefix that others
   went on from (one app's system prompt, a tool list, a RAG template): any
   replica ("spread"), so a shared prefix is cached once per replica instead of
   piling its conversations onto the first replica that had it; a known
   conversation whose own part no replica holds any more goes by rule 1 to
   where the longest part of it still is;
3. nothing known: any replica ("new"); the holders all over the bound: any
   other ("overflow"), and the next turn follows there.

A conversation that starts (or moves) has no cache to go to: it takes the
least loaded replica; among equals, the one that took the fewest conversations
lately (they will follow it, so this spreads them evenly); among equals (an
idle start), rendezvous hashing on the anchor: the key at the end of its first
message past the system prompt, the same in every turn and different between
users of one app. Another router learns where it went through the feed (a
write and a read, a millisecond or two) before its next turn comes.

The bound is `load_factor` times the mean load, counting this request
(consistent hashing with bounded load, Mirrokni et al., 2016), plus
`load_slack` requests: an engine batches, so one or two more in flight cost
less than a cold prefill, and at low load the bare bound (1 when fewer
requests than replicas are in flight) would move conversations off their
cache for nothing. The load is this router's requests in flight plus what the
engines report beyond them. A hot prefix spills instead of piling up.

What it cannot see: what an engine evicted (the index forgets by its own LRU,
not the engine's), a choice whose feed has not arrived yet, and tokens (the
cuts are in characters). A wrong guess costs a cache miss, never a wrong
answer. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nebula.models import Endpoint
from nebula.router.prompt_keys import Prompt, chain

MASK64 = (1 << 64) - 1
EMPTY: tuple[bool, tuple[str, ...]] = (False, ())
# How fast the count of conversations each replica took lately forgets: about the
# last 1 / (1 - STARTS_DECAY) starts weigh.
STARTS_DECAY = 0.97
# Sessions (tagged requests) whose prompts a router process remembers, to map an
# engine's evictions back to prefix keys: about 0.5 kB each (measured with 5 kB
# prompts), some 25 MB at most; an eviction of an older one is not mapped.
SESSIONS_LIMIT = 50_000
# Keys one replica's share of the outbox may hold between two flushes: a router
# that cannot reach Redis keeps its choices for itself past this.
OUTBOX_LIMIT = 50_000


def _mix(a: int, b: int) -> int:
    """A 64-bit rendezvous score for replica hash `a` and key `b` (splitmix64's finalizer)."""
    z = (a ^ b) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


class PrefixIndex:
    """Prefix key -> (whether some prompt went on past it, the replicas sent it, most
    recent last); bounded, the least recently used forgotten first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: dict[int, tuple[bool, tuple[str, ...]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def holders(self, key: int) -> tuple[str, ...]:
        return self._entries.get(key, EMPTY)[1]

    def known(self, key: int) -> bool:
        """Some prompt reached `key`, even if no replica holds it any more."""
        return key in self._entries

    def branched(self, key: int) -> bool:
        """Some prompt went on past `key`: a request that ends its known part here is
        a new branch (a new conversation on a shared prefix), not a next turn."""
        return self._entries.get(key, EMPTY)[0]

    def deepest(self, keys: Sequence[int]) -> int:
        """How many of `keys` lead the prompt in the index (0: none). A binary search:
        a key is known only if the keys before it are (`add` keeps them fresher)."""
        lo, hi = 0, len(keys)
        known = self._entries
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if keys[mid - 1] in known:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def add(self, keys: Sequence[int], replica: str) -> list[int]:
        """`replica` holds `keys` now; returns the keys it did not hold before, in
        order. Touched deepest first, so that a prefix is always fresher than what
        extends it (and forgotten after it)."""
        new = []
        entries = self._entries
        last = len(keys) - 1
        for i in range(last, -1, -1):
            key = keys[i]
            branched, had = entries.pop(key, EMPTY)
            if replica not in had:
                new.append(key)
                had = (*had[-7:], replica)  # a hot prefix's last 8 replicas
            entries[key] = (branched or i < last, had)
        while len(entries) > self.capacity:
            del entries[next(iter(entries))]
        new.reverse()
        return new

    def drop(self, keys: Sequence[int], replica: str) -> list[int]:
        """`replica` no longer holds `keys` (its engine evicted them); returns the
        keys it was known to hold."""
        entries = self._entries
        dropped = []
        for key in keys:
            branched, had = entries.get(key, EMPTY)
            if replica in had:
                dropped.append(key)
                entries[key] = (branched, tuple(r for r in had if r != replica))
        return dropped

    def drop_replica(self, replica: str) -> None:
        """`replica` holds nothing (its engine cleared its cache)."""
        for key, (branched, had) in list(self._entries.items()):
            if replica in had:
                self._entries[key] = (branched, tuple(r for r in had if r != replica))


@dataclass(frozen=True, slots=True)
class Choice:
    endpoint: Endpoint
    reason: str  # cached, spread, new or overflow (router_metrics.ROUTING)
    matched_chars: int  # of the prompt, the chosen replica holds as far as the index knows


class PrefixAffinity:
    """The cache-aware choice, the index it reads, and the keys to share."""

    def __init__(
        self,
        load_factor: float = 1.25,
        load_slack: int = 2,
        chunk_chars: int = 256,
        max_chars: int = 16384,
        capacity: int = 200_000,
    ) -> None:
        self.load_factor = load_factor
        self.load_slack = load_slack
        self.chunk_chars = chunk_chars
        self.max_chars = max_chars
        self.index = PrefixIndex(capacity)
        # Keys learned here and not yet shared: replica -> keys (prefix_feed.py sends them).
        self.outbox: dict[str, list[int]] = {}
        self._ids: dict[str, int] = {}  # placement id -> its rendezvous hash
        self.on_new: Callable[[], None] = lambda: None  # the outbox has something to send
        self._started: dict[str, float] = {}  # placement id -> conversations started, decayed
        self._weight = 1.0
        # Precise mode: the prompts of requests tagged with a session (see `tag`),
        # oldest first, and the keys learned dropped, to share.
        self.sessions: dict[str, tuple[array[int], array[int]]] = {}  # -> keys, ends
        self.session_prefix = "nebula:"
        self._session_seq = 0
        self.dropped: dict[str, list[int]] = {}

    def keys(self, payload: dict[str, Any]) -> Prompt:
        return chain(payload, self.chunk_chars, self.max_chars)

    def _id(self, placement_id: str) -> int:
        h = self._ids.get(placement_id)
        if h is None:
            if len(self._ids) > 4096:  # replicas come and go: keep it bounded
                self._ids.clear()
            digest = hashlib.blake2b(placement_id.encode(), digest_size=8).digest()
            h = self._ids[placement_id] = int.from_bytes(digest, "little")
        return h

    def choose(
        self, candidates: Sequence[Endpoint], load: Mapping[str, int], prompt: Prompt
    ) -> Choice:
        """The replica for `prompt` (see the module's doc); `load`: each replica's
        requests in flight as this router knows them."""
        keys = prompt.keys
        ids = [e.placement_id for e in candidates]
        get = load.get
        loads = dict(zip(ids, [get(pid, 0) for pid in ids], strict=True))
        bound = math.ceil(self.load_factor * (sum(loads.values()) + 1) / len(ids))
        bound += self.load_slack
        depth = self.index.deepest(keys)
        holders: list[str] = []
        while depth:  # the deepest known key that a live replica holds
            holders = [pid for pid in self.index.holders(keys[depth - 1]) if pid in loads]
            if holders:
                break
            depth -= 1
        tell = prompt.tell
        index = self.index
        if (
            holders
            and depth < len(keys)
            and index.branched(keys[depth - 1])
            and not index.known(tell)
        ):
            # A new conversation (its anchor never seen) on a prefix others went on
            # from (one app's system prompt): any replica; each caches the shared part
            # once, and this conversation's next turns follow it. A known one whose
            # own part is gone (evicted) goes where the longest part of it still is.
            pid = self._start(loads, tell)
            matched = prompt.ends[depth - 1] if pid in holders else 0
            return Choice(candidates[ids.index(pid)], "spread", matched)
        under = [pid for pid in holders if loads[pid] < bound]
        if under:
            pid = self._rendezvous(under, tell)
            return Choice(candidates[ids.index(pid)], "cached", prompt.ends[depth - 1])
        if holders:
            rest = {p: n for p, n in loads.items() if n < bound and p not in holders}
            pid = self._start(rest or loads, tell)
            return Choice(candidates[ids.index(pid)], "overflow", 0)
        return Choice(candidates[ids.index(self._start(loads, tell))], "new", 0)

    def _start(self, loads: dict[str, int], tell: int) -> str:
        """Where a conversation starts (or moves), having no cache to go to, among
        `loads`' replicas: the least loaded; among those, the one that took the
        fewest conversations lately (they will follow it: this spreads them evenly);
        among those (the idle start), rendezvous hashing on the anchor."""
        least = min(loads.values())
        pids = [p for p, n in loads.items() if n == least]
        if len(pids) > 1:
            started = self._started
            fewest = min([started.get(pid, 0.0) for pid in pids])
            pids = [p for p in pids if started.get(p, 0.0) <= fewest]
        pid = self._rendezvous(pids, tell)
        # Decayed counts: each start weighs 1/STARTS_DECAY more than the one before.
        started = self._started
        self._weight /= STARTS_DECAY
        started[pid] = started.get(pid, 0.0) + self._weight
        if self._weight > 1e100:  # rescale long before floats run out
            self._started = {
                p: n / self._weight for p, n in started.items() if n > self._weight * 1e-6
            }
            self._weight = 1.0
        return pid

    def _rendezvous(self, pids: Sequence[str], key: int) -> str:
        if len(pids) == 1:
            return pids[0]
        best, best_score = pids[0], -1
        for pid in pids:
            score = _mix(self._id(pid), key)
            if score > best_score:
                best, best_score = pid, score
        return best

    def record(self, prompt: Prompt, placement_id: str) -> None:
        """`placement_id` was sent `prompt`: it will hold it."""
        self._share(self.outbox, placement_id, self.index.add(prompt.keys, placement_id))

    def _share(self, box: dict[str, list[int]], placement_id: str, keys: list[int]) -> None:
        """Queue keys for the feed (bounded: past the limit, this router keeps them)."""
        if keys:
            queued = box.setdefault(placement_id, [])
            if len(queued) < OUTBOX_LIMIT:
                queued.extend(keys)
            self.on_new()

    def learn(self, placement_id: str, keys: Sequence[int]) -> None:
        """Another router sent `keys` to `placement_id`."""
        self.index.add(keys, placement_id)

    def take_outbox(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """The keys to share: sent, and learned dropped."""
        box, self.outbox = self.outbox, {}
        dropped, self.dropped = self.dropped, {}
        return box, dropped

    # Precise mode: what the engines say they evicted (agent/kv_watch.py).

    def tag(self, prompt: Prompt) -> str:
        """A session id for a request with `prompt` to an engine that publishes its
        KV-cache events: the events name it, and so the prompt they evicted."""
        self._session_seq += 1
        session = f"{self.session_prefix}{self._session_seq}"
        self.sessions[session] = (array("Q", prompt.keys), array("I", prompt.ends))
        if len(self.sessions) > SESSIONS_LIMIT:
            del self.sessions[next(iter(self.sessions))]
        return session

    def evicted(self, placement_id: str, session: str, fraction: float) -> None:
        """`placement_id`'s engine holds the prompt tagged `session` no further than
        `fraction` of it (a session this process did not tag: not ours, ignored)."""
        remembered = self.sessions.get(session)
        if remembered is None or not remembered[1]:
            return
        keys, ends = remembered
        cut = fraction * ends[-1]
        gone = [k for k, end in zip(keys, ends, strict=True) if end > cut]
        self._share(self.dropped, placement_id, self.index.drop(gone, placement_id))

    def learn_dropped(self, placement_id: str, keys: Sequence[int]) -> None:
        """Another router learned that `placement_id` no longer holds `keys`."""
        self.index.drop(keys, placement_id)

    def cleared(self, placement_id: str) -> None:
        self.index.drop_replica(placement_id)
