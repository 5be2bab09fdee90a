"""What this server saw of a task in earlier calls: the regions of each group, and the last mask of each class.

`PromptMemory` keeps it in this process (STATE_STORE=memory); `SharedPromptMemory` in a state store that all
workers share (disk or redis), so that any worker refines the mask another one made.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Hashable, Mapping, NamedTuple, Sequence

import numpy as np

from sam_backend.labelstudio.context import Region
from sam_backend.labelstudio.label_config import Target
from sam_backend.lru import BoundedLRU
from sam_backend.sam.types import Prompt
from sam_backend.store import StateStore, codec
from sam_backend.store.memory import MemoryStore

log = logging.getLogger(__name__)


Group = tuple[str, str]  # Region.group: (from_name, label as sent)


class Older(NamedTuple):
    """The regions of earlier actions that still count for a call: remembered ones of the groups the call
    lacks, and the draft's."""

    remembered: list[Region]
    drafted: list[Region]


def exchange_groups(groups: Mapping[Group, Sequence[Region]], call: Sequence[Region],
                    drafted: Sequence[Region]) -> tuple[dict[Group, tuple[Region, ...]], Older]:
    """A task's remembered groups after `call` (each of its groups replaces the earlier set), and what of the
    other groups and of the draft (`drafted`, newest draft) still counts.

    Label Studio resends a group whole in every call, so a call group that holds none of that group's earlier
    regions means the user removed them all: accepting a suggestion deletes the smart regions, and that object is
    finished. Its other groups are then the finished object's too (with the seed's alias labels, the `-1`
    clicks that kept a neighbour out, which would otherwise join the next object's first `1` click). They
    are dropped, except regions the draft still shows once it no longer holds the removed ones (placed after);
    a draft that still holds removed ones is older than the finish, and none of its regions of that class count.
    """
    calls: dict[Group, list[Region]] = {}
    for region in call:
        calls.setdefault(region.group, []).append(region)
    removed: dict[tuple[str, str], set[str]] = {}  # class -> ids of the call groups' earlier regions, all gone
    for group, regions in calls.items():
        earlier = {r.id for r in groups.get(group, ())}
        if earlier and not earlier & {r.id for r in regions}:
            removed.setdefault(regions[0].target_key, set()).update(earlier)
    drafted_ids = {r.id for r in drafted}
    stale = {target for target, ids in removed.items() if ids & drafted_ids}

    def counts(region: Region) -> bool:
        return region.target_key not in removed or (region.target_key not in stale and region.id in drafted_ids)

    updated: dict[Group, tuple[Region, ...]] = {}
    for group, regions in groups.items():
        kept = tuple(calls[group]) if group in calls else tuple(r for r in regions if counts(r))
        if kept:
            updated[group] = kept
    for group, regions in calls.items():
        updated.setdefault(group, tuple(regions))
    remembered = [r for group, regions in updated.items() if group not in calls for r in regions]
    return updated, Older(remembered, [r for r in drafted if r.target_key not in stale])


#: seconds an annotation's calls before its first autosave (unowned groups) are kept for the first call that names
#: their annotator: the editor autosaves within seconds, so older ones are of an object accepted before that
UNOWNED_TTL = 300.0
#: annotators of one task whose groups are remembered (drafts name any user a caller likes: a bound per task)
MAX_ANNOTATORS = 64


class Partition(NamedTuple):
    """One annotator's remembered groups of a task, and when a call last wrote them (the memory's clock, s)."""

    groups: dict[Group, tuple[Region, ...]]
    written: float


Partitions = dict[str | None, Partition]  # annotator (None: not named yet) -> their groups


def exchange_partitions(partitions: Mapping[str | None, Partition], annotator: str | None, call: Sequence[Region],
                        drafted: Sequence[Region], now: float) -> tuple[Partitions, Older]:
    """`exchange_groups` within one annotator's groups of a task, so that two annotators of one task never get
    each other's regions, nor finish each other's objects.

    Label Studio names the caller only in its own autosaved draft (`context.draft_author`). The first calls of an
    annotation come before any autosave (a fresh one, or one edited again after a submit, which deletes the
    draft): they name nobody and file their groups as the task's unowned ones (None). The first call that names
    its annotator and shows one of them (in the call or the draft, which is usually an action behind and may
    show only some) takes them all over, in place of that annotator's older groups (those of an annotation
    submitted since); a call that shows none leaves them (another annotator's first calls). Unowned groups
    that nobody takes over within UNOWNED_TTL seconds are dropped. Two annotators whose first calls of an
    annotation overlap share the unowned groups until one of them is named.
    """
    updated: Partitions = {owner: Partition(dict(part.groups), part.written) for owner, part in partitions.items()
                           if owner is not None or now - part.written <= UNOWNED_TTL}
    own = updated.pop(annotator).groups if annotator in updated else {}
    if annotator is not None and None in updated:
        shown = {r.id for r in call} | {r.id for r in drafted}
        if any(r.id in shown for regions in updated[None].groups.values() for r in regions):
            own = updated.pop(None).groups
    own, older = exchange_groups(own, call, drafted)
    excess = len(updated) + 1 - MAX_ANNOTATORS
    for owner, _ in sorted(updated.items(), key=lambda item: item[1].written)[:max(0, excess)]:
        del updated[owner]  # the least recently active annotators of a task beyond MAX_ANNOTATORS
    if own:
        updated[annotator] = Partition(own, now)
    return updated, older


@dataclass
class _TaskMemory:
    groups: Partitions = field(default_factory=dict)
    # target key -> (the prompt that produced the mask, its (1, 256, 256) low-resolution logits)
    masks: dict[tuple[str, str], tuple[Prompt, np.ndarray]] = field(default_factory=dict)


class PromptMemory:
    """Per task: regions seen in earlier calls, by group, and the last mask of each target.

    Bounded LRU with expiry: at most `max_tasks` tasks, and at most `max_tasks` remembered masks (one per task and
    class, 256 KiB each) in all, so PROMPT_MEMORY_SIZE bounds the (task, class) entries whatever the number of
    classes. A task unused for `ttl` seconds is forgotten. Thread-safe.

    The task table is a `BoundedLRU` whose entries are put again on every use, so its ttl counts from the last
    use. An expired task is dropped when it is next looked up or pushed out by newer ones; until then it stays
    first in the order, so its masks are the first the mask bound takes.
    """

    def __init__(self, max_tasks: int = 1024, ttl: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_tasks = max_tasks
        self.ttl = ttl
        self._clock = clock
        self._tasks: BoundedLRU[Hashable, _TaskMemory] = BoundedLRU(max_tasks, ttl=ttl, clock=clock)
        # The table locks each of its own operations; this one makes a call's read-modify-write of a task's
        # memory, and the mask bound across tasks, atomic.
        self._lock = threading.Lock()

    def exchange(self, task_key: Hashable, regions: Sequence[Region], drafted: Sequence[Region] = (),
                 annotator: str | None = None) -> Older:
        """Record this call's groups among `annotator`'s (`exchange_partitions`, `exchange_groups`); return what
        of the other groups and of the draft (`drafted`) still counts."""
        with self._lock:
            memory = self._touch(task_key)
            memory.groups, older = exchange_partitions(memory.groups, annotator, regions, drafted, self._clock())
        return older

    def previous_mask(self, task_key: Hashable, target: tuple[str, str], prompt: Prompt) -> np.ndarray | None:
        """The last mask's logits for `target` if `prompt` builds on the prompt that produced it (`_extends`) and
        is decoded in the same view (`Prompt.view`: logits are those of the frame they were decoded in).

        That is SAM's interactive protocol: each new click refines the previous mask. Any other change (a
        click removed or moved, another box, another view) starts afresh.
        """
        return _in_view(self.last_mask(task_key, target, prompt), prompt)

    def last_mask(self, task_key: Hashable, target: tuple[str, str],
                  prompt: Prompt) -> tuple[np.ndarray, tuple[int, int, int, int] | None] | None:
        """(logits, the view they were decoded in) of `target`'s last mask if `prompt` builds on the prompt that
        produced it (`_extends`: more clicks, or a box drawn around its clicks), whatever its view; None
        otherwise."""
        with self._lock:
            memory = self._tasks.get(task_key)
            entry = memory.masks.get(target) if memory is not None else None
        if entry is None:
            return None
        before, logits = entry
        return (logits, before.view) if _extends(before, prompt) else None

    def remember_mask(self, task_key: Hashable, target: tuple[str, str], prompt: Prompt, logits: np.ndarray) -> None:
        """Keep `logits`, the mask `prompt` produced for `target`, for the next call's `previous_mask`."""
        prompt = replace(prompt, mask_input=None, previous=None)  # not needed to compare prompts, and large
        with self._lock:
            memory = self._touch(task_key)
            memory.masks.pop(target, None)
            memory.masks[target] = (prompt, logits)  # newest last
            tasks = list(self._tasks.values())  # least recently used first; this task, just touched, comes last
            excess = sum(len(m.masks) for m in tasks) - self.max_tasks
            for older in tasks:
                while older.masks and excess > 0:
                    del older.masks[next(iter(older.masks))]  # a task's oldest mask first
                    excess -= 1
                if excess <= 0:
                    break

    def _touch(self, task_key: Hashable) -> _TaskMemory:
        """The task's memory, created if new or expired, marked as just used (which may push out the least
        recently used task). Lock held."""
        memory = self._tasks.get(task_key)
        if memory is None:
            memory = _TaskMemory()
        self._tasks.put(task_key, memory)  # put again: last in the order, and its ttl starts afresh
        return memory


def _same_box(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


class SharedPromptMemory:
    """`PromptMemory`'s interface, kept in a state store that every worker shares (STATE_STORE disk or redis).

    Per task and annotator one record of its groups' regions (namespace `prompt-groups-2`) and per (task, class)
    one record of the last mask's prompt and (1, 256, 256) float32 logits (`prompt-masks-2`, with the crop it was
    decoded in, if any), both expiring `ttl` seconds after they were last written. Each record is also kept in
    this process (`local`, bounded like PromptMemory) and stamped with its write time: when the shared store is
    degraded the worker answers from what it saw itself, and when it comes back the newer of the two copies wins.
    The store's own bound (bytes, LRU) replaces PROMPT_MEMORY_SIZE's count for the shared copy. With a record per
    annotator (and one of the task's unowned groups: `exchange_partitions`) calls of two annotators at once never
    overwrite each other's; two calls of one annotator at once (the editor sends them one after another) are not
    serialized across workers: the later write wins.
    """

    def __init__(self, store: StateStore, max_tasks: int = 1024, ttl: float = 3600.0) -> None:
        self.store = store
        self.max_tasks = max_tasks
        self.ttl = ttl
        # a mask record is about 256 KiB; max_tasks of them and their tasks' groups
        self._local = MemoryStore(max_bytes=max_tasks * (300 << 10), max_items=4 * max_tasks)

    def exchange(self, task_key: Hashable, regions: Sequence[Region], drafted: Sequence[Region] = (),
                 annotator: str | None = None) -> Older:
        """As `PromptMemory.exchange`."""
        owners = [annotator] if annotator is None else [annotator, None]
        partitions: Partitions = {}
        for owner in owners:
            record = self._read(GROUPS, _groups_key(task_key, owner))
            if record is not None:
                meta = record[1]
                partitions[owner] = Partition({(g[0], g[1]): tuple(_region(r) for r in rs) for g, rs in meta["groups"]},
                                              meta["written"])
        updated, older = exchange_partitions(partitions, annotator, regions, drafted, time.time())
        for owner in owners:
            key = _groups_key(task_key, owner)
            if owner == annotator and owner in updated:
                part = updated[owner]
                self._write(GROUPS, key, {}, {"written": part.written, "groups": [
                    [list(group), [asdict(r) for r in rs]] for group, rs in part.groups.items()]})
            elif owner in partitions and owner not in updated:  # taken over, expired, or emptied
                self._delete(GROUPS, key)
        return older

    def previous_mask(self, task_key: Hashable, target: tuple[str, str], prompt: Prompt) -> np.ndarray | None:
        """As `PromptMemory.previous_mask`."""
        return _in_view(self.last_mask(task_key, target, prompt), prompt)

    def last_mask(self, task_key: Hashable, target: tuple[str, str],
                  prompt: Prompt) -> tuple[np.ndarray, tuple[int, int, int, int] | None] | None:
        """As `PromptMemory.last_mask`."""
        record = self._read(MASKS, _store_key(task_key, target))
        if record is None:
            return None
        arrays, _ = record
        view = arrays.get("view")
        before = Prompt(points=arrays["points"], labels=arrays["labels"], box=arrays.get("box"),
                        view=None if view is None else tuple(int(v) for v in view))
        return (np.array(arrays["logits"]), before.view) if _extends(before, prompt) else None

    def remember_mask(self, task_key: Hashable, target: tuple[str, str], prompt: Prompt, logits: np.ndarray) -> None:
        arrays = {"points": np.asarray(prompt.points), "labels": np.asarray(prompt.labels),
                  "logits": np.asarray(logits)}
        if prompt.box is not None:
            arrays["box"] = np.asarray(prompt.box)
        if prompt.view is not None:
            arrays["view"] = np.asarray(prompt.view, dtype=np.int64)
        self._write(MASKS, _store_key(task_key, target), arrays, {})

    # ---- records -----------------------------------------------------------------------------------------
    def _read(self, namespace: str, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
        """The newer of the shared and the local record (arrays, meta), or None."""
        found = []
        for store in (self.store, self._local):
            value = store.get(namespace, key)
            if value is None:
                continue
            try:
                found.append(codec.unpack(value))
            except codec.CorruptEntry as error:
                log.warning("dropping a corrupt %s record from the %s state store: %s", namespace, store.kind, error)
                store.delete(namespace, key)
        return max(found, key=lambda record: record[1].get("stamp", 0.0)) if found else None

    def _delete(self, namespace: str, key: str) -> None:
        self._local.delete(namespace, key)
        self.store.delete(namespace, key)

    def _write(self, namespace: str, key: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        value = codec.pack(arrays, {**meta, "stamp": time.time()})
        self._local.put(namespace, key, value, self.ttl)
        self.store.put(namespace, key, value, self.ttl)


#: "-2": records hold one annotator's groups of a task; a worker of an older version would take them for a task's
GROUPS = "prompt-groups-2"
#: "-2": since a mask may be a crop's (zoom-in), records carry a view; a worker of an older version sharing the store
#: would read them as whole-image masks, so they live apart
MASKS = "prompt-masks-2"


def _groups_key(task_key: Hashable, annotator: str | None) -> str:
    """The store key of one annotator's groups of a task (None: the task's unowned ones)."""
    return _store_key(task_key, ("annotator", annotator or ""))


def _store_key(task_key: Hashable, target: tuple[str, str] | None = None) -> str:
    """A task key (project, task id, image URL) and a class as one store key: the SHA-256 of their JSON."""
    parts = [list(task_key) if isinstance(task_key, tuple) else task_key, list(target) if target else None]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _region(data: dict) -> Region:
    target = Target(**data["target"])
    original = data.get("original_size")
    return Region(**{**data, "group": tuple(data["group"]), "target": target,
                     "original_size": tuple(original) if original is not None else None})


def _extends(before: Prompt, prompt: Prompt) -> bool:
    """Whether `prompt` builds on `before`: every old click kept, and either more clicks with the same box (a
    click on the very spot of an earlier one adds no new row, but it is a click: the user wants more of that) or
    a box where `before` had none, drawn in this call (`Prompt.new_box`: `refinement.box_after_clicks` weighs the
    clicks' mask against the box; a box that was there already, from the draft or an earlier object, is not
    one the mask was made for)."""
    # SAM's prompt tokens carry no order, so "adds clicks" is set containment of (x, y, label) rows.
    old_rows = {tuple(row) for row in np.column_stack([before.points, before.labels]).tolist()}
    new_rows = {tuple(row) for row in np.column_stack([prompt.points, prompt.labels]).tolist()}
    if not old_rows <= new_rows:
        return False
    if before.box is None and prompt.box is not None:
        return prompt.new_box
    return len(prompt.points) > len(before.points) and _same_box(prompt.box, before.box)


def _in_view(last: tuple[np.ndarray, tuple[int, int, int, int] | None] | None, prompt: Prompt) -> np.ndarray | None:
    """The logits of `last` (`last_mask`'s answer) when they were decoded in `prompt`'s view."""
    return last[0] if last is not None and last[1] == prompt.view else None
