"""sam_backend.store: the three backends behind one interface (a real redis-server on loopback, a real SQLite
file, shared by real processes), the guard that turns store faults into local work, the checked codec, and the
shared prompt memory and embedding cache built on them."""
from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from sam_backend.cache import EmbeddingCache, pack_embedding, unpack_embedding
from sam_backend.labelstudio.memory import PromptMemory, SharedPromptMemory
from sam_backend.sam.types import Embedding
from sam_backend.store import GuardedStore, StoreError, codec, open_store
from sam_backend.store.disk import DiskStore
from sam_backend.store.sealing import Sealer
from tests.unit.test_memory import click, logits, prompt
from tools.harness.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "disk", "redis"])
def store(request, tmp_path, redis_server):
    if request.param == "memory":
        store = open_store("memory")
    elif request.param == "disk":
        store = open_store(f"disk:{tmp_path / 'state'}")
    else:
        store = open_store(redis_server.url)
        store._redis.flushdb()
    yield store
    store.close()


def embedding(seed: int = 0) -> Embedding:
    features = np.random.default_rng(seed).standard_normal((1, 256, 64, 64)).astype(np.float16)
    return Embedding(features=features, original_size=(300, 451), input_size=(681, 1024))


def test_values_expire_and_go(store):
    store.put("ns", "a", b"one")
    store.put("ns", "b", b"two", ttl=0.3)
    assert (store.get("ns", "a"), store.get("ns", "b"), store.get("other", "a")) == (b"one", b"two", None)
    time.sleep(0.5)
    assert store.get("ns", "b") is None
    store.delete("ns", "a")
    assert store.get("ns", "a") is None


def test_a_lease_has_one_holder_until_released_or_expired(store):
    token = store.acquire("embed:x", ttl=30)
    assert token is not None and store.held("embed:x")
    assert store.acquire("embed:x", ttl=30) is None
    store.release("embed:x", "not-the-token")
    assert store.held("embed:x")
    store.release("embed:x", token)
    assert not store.held("embed:x")
    assert store.acquire("embed:y", ttl=0.2) is not None
    time.sleep(0.4)  # its holder died: the lease expires
    assert not store.held("embed:y") and store.acquire("embed:y", ttl=30) is not None


def test_a_lease_is_renewed_only_by_its_holder_and_only_while_held(store):
    token = store.acquire("embed:r", ttl=0.3)
    assert not store.renew("embed:r", "not-the-token", 30)
    time.sleep(0.15)
    assert store.renew("embed:r", token, 0.6)
    time.sleep(0.3)  # past the first ttl: the renewal keeps it
    assert store.held("embed:r") and store.acquire("embed:r", ttl=30) is None
    time.sleep(0.45)
    assert not store.held("embed:r") and not store.renew("embed:r", token, 30)  # expired: another may take it
    assert store.acquire("embed:r", ttl=30) is not None


def test_the_disk_store_is_bounded_in_bytes_and_drops_the_least_recently_used(tmp_path):
    store = DiskStore(tmp_path, max_bytes=3 << 20, used_resolution=0)
    one_mib = b"x" * (1 << 20)
    for key in "abc":
        store.put("ns", key, one_mib)
    time.sleep(0.05)
    assert store.get("ns", "a") == one_mib  # a is used again: b is now the least recently used
    store.put("ns", "d", one_mib)
    assert [store.get("ns", key) is not None for key in "abcd"] == [True, False, True, True]
    assert DiskStore(tmp_path).get("ns", "d") == one_mib, "another opener (a restart) sees it"


def _take(folder: str, queue) -> None:
    queue.put(DiskStore(folder).acquire("embed:same", ttl=60) is not None)


def test_the_disk_lease_is_exclusive_across_processes(tmp_path):
    DiskStore(tmp_path)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_take, args=(str(tmp_path), queue)) for _ in range(4)]
    for worker in workers:
        worker.start()
    taken = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert sorted(taken) == [False, False, False, True]


def test_a_full_disk_degrades_the_store_once_and_it_recovers(tmp_path, caplog):
    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    class FullDisk(DiskStore):
        """A disk that is full (to SQLite: SQLITE_FULL, as on a full file system) while `full` is set."""

        full = True

        def _connection(self):
            connection = super()._connection()
            connection.execute(f"PRAGMA max_page_count = {64 if self.full else 1073741823}")
            return connection

    clock = Clock()
    disk = FullDisk(tmp_path)
    guarded = GuardedStore(disk, retry_after=5, clock=clock)
    with pytest.raises(StoreError, match="full"):
        disk.put("ns", "big", b"x" * (1 << 20))
    guarded.put("ns", "big", b"x" * (1 << 20))  # no error reaches the caller
    guarded.put("ns", "big", b"x" * (1 << 20))
    assert guarded.degraded and guarded.status()["status"] == "degraded"
    assert guarded.get("ns", "big") is None and guarded.acquire("l", 10) is None
    assert sum("is degraded" in r.message for r in caplog.records) == 1
    disk.full = False  # space again
    assert guarded.get("ns", "small") is None and guarded.degraded, "not asked again before retry_after"
    clock.now = 6
    guarded.put("ns", "small", b"y")
    assert guarded.get("ns", "small") == b"y" and guarded.status()["status"] == "ok"
    assert sum("is back" in r.message for r in caplog.records) == 1


def test_a_stopped_redis_is_a_store_error_not_a_hang(tmp_path):
    server = RedisServer(tmp_path).start()
    store = open_store(server.url)
    store.put("ns", "k", b"v")
    server.stop()
    started = time.monotonic()
    with pytest.raises(StoreError, match="redis"):
        store.get("ns", "k")
    assert time.monotonic() - started < 10
    server.start()
    assert store.get("ns", "k") is None  # no persistence: a restarted Redis is empty, and reachable again


def test_the_codec_refuses_anything_but_an_intact_value():
    value = codec.pack({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([True])}, {"n": 1})
    arrays, meta = codec.unpack(value)
    assert arrays["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and arrays["b"].dtype == bool and meta == {"n": 1}
    flipped = bytearray(value)
    flipped[len(value) // 2] ^= 1
    for bad in (bytes(flipped), value[:-1], value[:20], b"", b"x" * 100, value + b"!"):
        with pytest.raises(codec.CorruptEntry):
            codec.unpack(bad)


def test_an_embedding_round_trips_by_its_fields():
    original = embedding()
    copy = unpack_embedding(pack_embedding(original))
    assert copy.original_size == (300, 451) and copy.input_size == (681, 1024)
    assert copy.features.dtype == np.float16 and np.array_equal(copy.features, original.features)
    assert len(pack_embedding(original)) - original.nbytes < 400  # the header is small


def test_an_embedding_with_extra_arrays_round_trips_whole():
    """SAM 2's embedding carries high-resolution features besides `features`: every array comes back, by name."""
    from sam_backend.sam.types import Embedding

    rng = np.random.default_rng(5)
    original = Embedding(features=rng.random((1, 256, 64, 64)).astype(np.float16), original_size=(480, 640),
                         input_size=(1024, 1024),
                         extras={"high_res_0": rng.random((1, 32, 256, 256)).astype(np.float16),
                                 "high_res_1": rng.random((1, 64, 128, 128)).astype(np.float16)})
    copy = unpack_embedding(pack_embedding(original))
    assert sorted(copy.arrays()) == ["features", "high_res_0", "high_res_1"]
    assert all(np.array_equal(copy.arrays()[name], array) for name, array in original.arrays().items())
    assert (copy.original_size, copy.input_size, copy.nbytes) == ((480, 640), (1024, 1024), original.nbytes)


def test_sealed_values_open_only_with_their_secret():
    sealed = Sealer("one").seal(b'{"token": "secret-token"}')
    assert b"secret-token" not in sealed
    assert Sealer("one").open(sealed) == b'{"token": "secret-token"}'
    assert Sealer("two").open(sealed) is None and Sealer("one").open(sealed[:-2]) is None


def test_two_processes_share_one_prompt_memory(tmp_path):
    """Two SharedPromptMemory on one disk store (two workers) answer as one PromptMemory."""
    first, second = (SharedPromptMemory(GuardedStore(DiskStore(tmp_path))) for _ in range(2))
    single = PromptMemory()
    key, target = ("7", 1, "/data/upload/1/a.jpg"), ("tag", "Cat")
    for memory in (first, single):
        assert memory.exchange(key, [click("a", "1")]).remembered == []
        memory.remember_mask(key, target, prompt((1, 2, 1)), logits(3))
    for memory in (second, single):
        assert memory.exchange(key, [click("b", "-1")]).remembered == [click("a", "1")]
        found = memory.previous_mask(key, target, prompt((1, 2, 1), (5, 6, 0)))
        assert found is not None and float(found.max()) == 3.0
        assert memory.previous_mask(key, target, prompt((5, 6, 0))) is None  # not an extension


def test_a_corrupt_prompt_record_is_dropped_not_used(tmp_path):
    store = GuardedStore(DiskStore(tmp_path))
    memory = SharedPromptMemory(store)
    key, target = ("7", 2, "u"), ("tag", "Cat")
    memory.remember_mask(key, target, prompt((1, 2, 1)), logits(3))
    other = SharedPromptMemory(store)  # a worker that has no copy of its own
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    with db:
        db.execute("UPDATE entries SET value = substr(value, 1, 1000) WHERE namespace = 'prompt-masks-2'")
    assert other.previous_mask(key, target, prompt((1, 2, 1), (3, 4, 1))) is None
    assert memory.previous_mask(key, target, prompt((1, 2, 1), (3, 4, 1))) is not None  # its own copy


def test_two_caches_on_one_store_embed_once_and_survive_a_corrupt_entry(tmp_path):
    store = GuardedStore(DiskStore(tmp_path))
    runs = []

    def compute():
        runs.append(1)
        time.sleep(0.3)
        return embedding()

    caches = [EmbeddingCache(compact=True, store=store) for _ in range(2)]

    results = []
    threads = [threading.Thread(target=lambda c=c: results.append(c.get_or_compute(("m", "d1"), compute)))
               for c in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(runs) == 1 and np.array_equal(results[0].features, results[1].features)
    assert sorted([caches[0].computed, caches[1].computed]) == [0, 1]
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    with db:
        db.execute("UPDATE entries SET value = X'00' WHERE namespace = 'embedding'")
    third = EmbeddingCache(compact=True, store=store)
    assert third.get(("m", "d1")) is None  # corrupt: a miss, and dropped
    third.get_or_compute(("m", "d1"), compute)
    assert len(runs) == 2 and third.computed == 1


def test_state_store_defaults_to_a_shared_disk_store_for_more_than_one_worker():
    from sam_backend import settings

    assert settings.from_environment({}).state_store_spec == "memory"
    assert settings.from_environment({"WORKERS": "4"}).state_store_spec == f"disk:{settings.DEFAULT_STORE_FOLDER}"
    assert settings.from_environment({"WORKERS": "4", "STATE_STORE": "memory"}).state_store_spec == "memory"
    assert settings.from_environment({"STATE_STORE": "redis://h:6379/1"}).state_store_spec == "redis://h:6379/1"
    for bad in ("disk:", "postgres://x", "mem"):
        with pytest.raises(ValueError, match="STATE_STORE"):
            settings.from_environment({"STATE_STORE": bad})


def test_health_says_degraded_while_the_store_is_gone_and_answers_stay_200(tmp_path):
    """SamModel on a Redis that is stopped: /predict answers from local work, /health reports the store."""
    from model import SamModel
    from sam_backend.http import create_app
    from sam_backend.settings import Settings
    from tools.harness.fake_predictor import FakePredictor
    from tools.harness.recordings import CHELSEA, recorded, with_image
    from tools.harness.stub_label_studio import TOKEN, FakeLabelStudio

    label_studio = FakeLabelStudio(TOKEN)
    server = RedisServer(tmp_path).start()
    try:
        path = label_studio.add_image("/data/upload/1/h.jpg", CHELSEA)
        settings = Settings(label_studio_url=label_studio.url, label_studio_api_key=TOKEN, state_store=server.url)
        client = create_app(SamModel(FakePredictor(), settings), settings).test_client()
        body = with_image(recorded("keypoints_positive_and_negative"), path, task_id=3)
        assert client.post("/predict", json=body).status_code == 200
        assert client.get("/health").json["state_store"] == {"backend": "redis", "location": server.url,
                                                              "status": "ok", "faults": 0}
        server.stop()
        answer = client.post("/predict", json=body)
        assert answer.status_code == 200 and answer.json["results"][0]["result"]
        health = client.get("/health").json
        assert health["status"] == "UP" and health["state_store"]["status"] == "degraded"
    finally:
        server.stop()
        label_studio.close()


def test_setup_access_reaches_other_workers_only_sealed_and_only_with_the_secret(tmp_path):
    """/setup on one worker; a second worker with the same STATE_STORE_SECRET fetches the project's images, one
    with another secret cannot; the token is nowhere in the store's file."""
    from model import SamModel
    from sam_backend.errors import ImageError
    from sam_backend.settings import Settings
    from tools.harness.fake_predictor import FakePredictor
    from tools.harness.recordings import CHELSEA, recorded, with_image
    from tools.harness.stub_label_studio import TOKEN, FakeLabelStudio

    label_studio = FakeLabelStudio(TOKEN)
    try:
        path = label_studio.add_image("/data/upload/1/s.jpg", CHELSEA)
        settings = Settings(state_store=f"disk:{tmp_path}", state_store_secret="shared-secret")
        first, second = (SamModel(FakePredictor(), settings) for _ in range(2))
        stranger = SamModel(FakePredictor(), Settings(state_store=f"disk:{tmp_path}", state_store_secret="other"))
        first.setup({"project": "9.1", "hostname": label_studio.url, "access_token": TOKEN}, peer="127.0.0.1")
        body = with_image(recorded("keypoints_positive_and_negative"), path, task_id=4)
        body["project"] = "9.1"
        assert second.predict(body)["results"][0]["result"]
        assert label_studio.count(path) == 1
        with pytest.raises(ImageError, match="no Label Studio is known"):
            stranger.predict(with_image(recorded("keypoints_positive_and_negative"), "/data/upload/1/t.jpg", 5)
                             | {"project": "9.1"})
        assert TOKEN.encode() not in (tmp_path / "state.sqlite3").read_bytes()
        assert not any(TOKEN.encode() in p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    finally:
        label_studio.close()


def test_the_view_of_a_mask_is_shared_and_refines_only_in_that_view(tmp_path):
    """A mask decoded in a crop (sam.zoom) is remembered with its crop by every kind of memory: its logits refine
    the next click only in that crop, and `last_mask` gives both to choose the next click's crop from."""
    first, second = (SharedPromptMemory(GuardedStore(DiskStore(tmp_path))) for _ in range(2))
    single = PromptMemory()
    key, target, view = ("7", 3, "/data/upload/1/a.jpg"), ("tag", "Cat"), (100, 50, 420, 290)
    for memory in (first, single):
        memory.remember_mask(key, target, replace(prompt((150, 60, 1), (160, 70, 1)), view=view), logits(4))
    added = prompt((150, 60, 1), (160, 70, 1), (200, 90, 0))
    for memory in (second, single):
        found, seen_in = memory.last_mask(key, target, added)
        assert float(found.max()) == 4.0 and seen_in == view
        assert memory.previous_mask(key, target, replace(added, view=view)) is not None
        assert memory.previous_mask(key, target, added) is None  # the whole image: not the crop's logits
        assert memory.previous_mask(key, target, replace(added, view=(0, 0, 320, 240))) is None
        assert memory.last_mask(key, target, prompt((150, 60, 1))) is None  # not an extension
