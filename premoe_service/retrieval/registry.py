"""The task registry: profiles in a store, their demo embeddings in a task index, and routing over both."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Hashable, Sequence
from typing import Literal

import numpy as np

from ..errors import DataCorruption, FailedPrecondition, InvalidArgument, NotFound, PreMoeError, Unavailable
from ..names import check_task_name
from ..profiler.profile import Profile
from ..runtime.router_signal import RouterSignal
from .decision import RouteDecision, RoutePolicy
from .demo_vectors import demo_vectors
from .embedder import Embedder
from .evidence import RouterEvidence
from .index import HNSW_THRESHOLD, IndexKind, TaskIndex
from .profile_store import MemoryProfileStore, ProfileStore
from .router import Router, check_prompt
from .routing_record import ROUTING_FILE, RoutingRecord

log = logging.getLogger(__name__)

_UNSET = object()  # version token before the first load: never equal to a store's token


class Registry:
    """The registered tasks: profiles (the source of truth, in a store) and the index derived from them.

    At start-up every profile in the store is read and the index is built from their demo
    embeddings. A profile whose embeddings are missing or came from another embedder is embedded
    from its demos with this registry's embedder. Before each `route`, `get` and `names` the
    registry checks the store's version token (one cheap read) and, when it moved, reloads only the
    tasks whose revision changed, so replicas on one Redis see each other's changes without restart.

    All methods may be called from several threads: index changes and searches hold one lock;
    prompts are embedded outside it.

    Args:
        store: Where profiles live; a `LocalProfileStore`, a `RedisProfileStore`, or None for memory.
        embedder: Encodes demos and prompts.
        policy: Thresholds and fallback of `route`.
        fingerprint: When given, profiles of another model fingerprint are refused.
        index_kind: "auto", "flat" or "hnsw" (see `TaskIndex`).
        hnsw_threshold: Vector count where "auto" moves to HNSW.
        strict: At start-up, fail on the first unreadable profile instead of skipping it with a
            logged error. Skipping is the default: one damaged file should not take every other task
            offline; the skipped tasks and their errors are in `problems`.
        refresh_interval: Seconds between version checks of the store (0: before every call).
        retry_after: Seconds to wait before asking an unreachable store again.
        signal: The model's router signal: with it a prompt is routed on both signals (`decision`), and a
            profile without a router signal (format 1) gets one computed from its demos.
        background: Off-topic prompts (needs `signal`): a none-class a prompt must not resemble more than its
            best task (see `RoutePolicy.min_lead`). Without it, the store's routing record (`routing.json` beside
            the profiles, or its copy in Redis) gives the background, and its calibrated leads fill the policy's
            `task_leads` unless the policy names its own: routing is then the one the record was measured with.

    Raises:
        Unavailable: The store cannot be reached at start-up (there is nothing to serve from yet).
        DataCorruption: With `strict`, a profile cannot be read (the error names it).
    """

    def __init__(
        self,
        store: ProfileStore | None = None,
        *,
        embedder: Embedder,
        policy: RoutePolicy | None = None,
        fingerprint: str | None = None,
        index_kind: IndexKind = "auto",
        hnsw_threshold: int = HNSW_THRESHOLD,
        strict: bool = False,
        refresh_interval: float = 0.0,
        retry_after: float = 5.0,
        signal: RouterSignal | None = None,
        background: Sequence[str] = (),
    ) -> None:
        if refresh_interval < 0 or retry_after < 0:
            raise InvalidArgument("refresh_interval and retry_after must be >= 0", field="refresh_interval")
        self.store: ProfileStore = store if store is not None else MemoryProfileStore()
        self.embedder = embedder
        self.fingerprint = fingerprint
        self.refresh_interval = refresh_interval
        self.retry_after = retry_after
        self.problems: dict[str, PreMoeError] = {}
        self.store_error: Unavailable | None = None
        self._index = TaskIndex(embedder.dim, kind=index_kind, hnsw_threshold=hnsw_threshold)
        self._router = Router(embedder, self._index, policy)
        if background and signal is None:
            raise InvalidArgument("an off-topic background needs the router signal (give a store)", field="background")
        self.evidence = None if signal is None else RouterEvidence(signal)
        if self.evidence is not None and background:
            self._set_background(self.evidence, background)
        self._own_background = bool(background)
        self._own_leads = bool(self._router.policy.task_leads)
        self.routing_record: RoutingRecord | None = None  # the store's record in use, when there is one
        self._routing_bytes: bytes | None = None
        self._profiles: dict[str, Profile] = {}
        self._revisions: dict[str, Hashable] = {}
        self._token: object = _UNSET
        self._next_check = 0.0
        self._lock = threading.RLock()
        self._probe = threading.Lock()
        with self._lock:
            self._sync(strict=strict)

    @property
    def policy(self) -> RoutePolicy:
        return self._router.policy

    @policy.setter
    def policy(self, policy: RoutePolicy) -> None:
        with self._lock:
            self._router.policy = policy

    @property
    def index(self) -> TaskIndex:
        """The derived index (read-only use: change tasks through the registry)."""
        return self._index

    def register(self, profile: Profile, *, replace: bool = False) -> Profile:
        """Store a task's profile and index its demos; returns the profile as kept (with embeddings).

        Raises:
            AlreadyExists: The task exists and `replace` is False.
            FailedPrecondition: The profile is for another model fingerprint.
            InvalidArgument: The profile has neither usable embeddings nor demos to embed.
            Unavailable: The store cannot be written.
        """
        if not isinstance(profile, Profile):
            raise InvalidArgument(f"expected a Profile, got {type(profile).__name__}", field="profile")
        profile, vectors = self._prepare(profile)  # may embed: outside the lock
        with self._lock:
            revision = self.store.write(profile, replace=replace)
            self._index.add(profile.name, vectors)
            if self.evidence is not None:
                self.evidence.add(profile)
            self._profiles[profile.name] = profile
            self._revisions[profile.name] = revision
            self.problems.pop(profile.name, None)
        log.info("registered task %s (%d demos)", profile.name, vectors.shape[0])
        return profile

    def delete(self, name: str) -> None:
        """Remove a task from the store and the index.

        Raises:
            NotFound: No task has this name in the store.
            Unavailable: The store cannot be written.
        """
        check_task_name(name)
        with self._lock:
            self.store.delete(name)
            self._forget(name)
        log.info("deleted task %s", name)

    def get(self, name: str) -> Profile:
        """The profile of a registered task; NotFound when there is none."""
        check_task_name(name)
        self._refresh_quietly()
        with self._lock:
            if name not in self._profiles:
                raise NotFound(f"no task named {name!r}", field="name")
            return self._profiles[name]

    def names(self) -> list[str]:
        """Registered task names, sorted."""
        self._refresh_quietly()
        with self._lock:
            return sorted(self._profiles)

    def __len__(self) -> int:
        with self._lock:
            return len(self._profiles)

    def route(self, prompt: str) -> RouteDecision:
        """The task (or fallback) for a prompt, with the profiles of the tasks it names (`RouteDecision.profiles`,
        taken with the search: no second read); see `RoutePolicy` for how it decides.

        Raises:
            InvalidArgument: The prompt is empty or blank (field "prompt"); a `CheckedPrompt` (a door's) is taken
                as it is.
        """
        check_prompt(prompt)
        self._refresh_quietly()
        pending = None if self.evidence is None else self.evidence.begin(prompt)  # overlaps the embedding
        query = self.embedder.encode([prompt])  # [1, dim]
        features = None if pending is None else pending.result()
        with self._lock:
            decision = self._router.decide_embedded(query, features, self.evidence)[0]
            named = [decision.task] if decision.task is not None else decision.fallback_tasks
            decision.profiles = {name: self._profiles[name] for name in named if name in self._profiles}
            return decision

    def refresh(self) -> bool:
        """Bring the index up to date with the store; returns whether any task changed.

        Raises:
            Unavailable: The store cannot be reached.
        """
        with self._lock:
            return self._sync(strict=False)

    def health(self) -> Literal["ok", "degraded"]:
        """`degraded` while the store cannot be reached (the tasks in memory keep serving), else `ok`."""
        return "ok" if self.store_error is None else "degraded"

    def _refresh_quietly(self) -> None:
        # Requests never fail because the store is away: they are served from the tasks in memory. One thread
        # at a time asks the store (the others serve from memory meanwhile), and after a failure nobody asks
        # again for `retry_after` seconds: a frozen store costs one timeout per interval, not one per request.
        if time.monotonic() < self._next_check or not self._probe.acquire(blocking=False):
            return
        try:
            # The common case, nothing changed, costs one version read and never waits for the lock.
            if self.store.version() != self._token:
                with self._lock:
                    self._sync(strict=False)
        except Unavailable as exc:
            if self.store_error is None:
                log.warning("profile store unreachable, serving the %d tasks in memory: %s", len(self), exc)
            self.store_error = exc
            self._next_check = time.monotonic() + self.retry_after
            return
        finally:
            self._probe.release()
        if self.store_error is not None:
            log.warning("profile store reachable again")
            self.store_error = None
        self._next_check = time.monotonic() + self.refresh_interval

    def _sync(self, *, strict: bool) -> bool:
        token = self.store.version()
        if token == self._token:
            return False
        revisions = self.store.revisions()
        gone = [name for name in self._revisions if name not in revisions]
        changed = [name for name, rev in revisions.items() if self._revisions.get(name) != rev]
        loaded: list[tuple[Profile, np.ndarray, Hashable]] = []
        for name in changed:
            try:
                profile, revision = self.store.read(name)
                profile, vectors = self._prepare(profile)
            except NotFound:
                gone.append(name)  # deleted since it was listed
                continue
            except (DataCorruption, FailedPrecondition, InvalidArgument) as exc:
                if strict:
                    raise
                log.error("skipping task %s: %s", name, exc)
                gone.append(name)
                self.problems[name] = exc
                continue
            loaded.append((profile, vectors, revision))
        self._index.remove_many(gone)  # one HNSW rebuild for all of them
        for name in gone:
            problem = self.problems.get(name)
            self._forget(name)
            if problem is not None and name in revisions:
                self.problems[name] = problem  # skipped, not deleted: keep it reported
                self._revisions[name] = revisions[name]  # and do not retry until it changes
        # One index update for everything that changed: a single HNSW rebuild at start-up.
        self._index.add_many((profile.name, vectors) for profile, vectors, _ in loaded)
        for profile, _, revision in loaded:
            if self.evidence is not None:
                self.evidence.add(profile)
            self._profiles[profile.name] = profile
            self._revisions[profile.name] = revision
            self.problems.pop(profile.name, None)
        routed = self._adopt_routing()
        self._token = token
        return bool(loaded or gone or routed)

    def _adopt_routing(self) -> bool:
        """Route with the store's routing record when it changed (the background and leads it names, unless this
        registry was given its own); returns whether it changed."""
        data = self.store.routing() if hasattr(self.store, "routing") else None
        if data == self._routing_bytes:
            return False
        record = None if data is None else RoutingRecord.from_bytes(data, source=self._routing_source())
        if self.evidence is not None and not self._own_background:
            if record is not None and record.background:
                self._set_background(self.evidence, record.background)
            else:
                self.evidence.clear_background()
        if not self._own_leads:
            leads = {} if record is None else dict(record.task_leads)
            self._router.policy = dataclasses.replace(self._router.policy, task_leads=leads)
        self._routing_bytes, self.routing_record = data, record
        if record is not None:
            log.info("routing record: %d background prompts, %d leads", len(record.background), len(record.task_leads))
        return True

    def _routing_source(self) -> str:
        directory = getattr(self.store, "directory", None)
        return str(directory / ROUTING_FILE) if directory is not None else "the store's routing record"

    def _set_background(self, evidence: RouterEvidence, background: Sequence[str]) -> None:
        texts = [check_prompt(text, field=f"background[{i}]") for i, text in enumerate(background)]
        evidence.set_background(self.embedder.encode(texts), evidence.signal.features(texts))

    def _forget(self, name: str) -> None:
        self._index.remove(name)
        if self.evidence is not None:
            self.evidence.remove([name])
        self._profiles.pop(name, None)
        self._revisions.pop(name, None)
        self.problems.pop(name, None)

    def _prepare(self, profile: Profile) -> tuple[Profile, np.ndarray]:
        """The profile with demo embeddings of this registry's embedder, and those vectors. [n, dim]"""
        if self.fingerprint is not None and profile.fingerprint != self.fingerprint:
            raise FailedPrecondition(
                f"task {profile.name!r} was profiled on model {profile.fingerprint!r}, this registry serves "
                f"{self.fingerprint!r}; profile the task again on this model",
                field="fingerprint",
            )
        if self.evidence is not None:
            profile = self.evidence.prepare(profile)
        profile, vectors = demo_vectors(profile, self.embedder)
        return profile, self._index.check_vectors(profile.name, vectors)
