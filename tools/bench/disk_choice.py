"""Why the disk store is SQLite: DiskStore against diskcache.Cache (LRU), the same operations, 1 and 8 processes.

    pip install --target /tmp/dc diskcache && PYTHONPATH=.:/tmp/dc python -m tools.bench.disk_choice

A warm click writes and reads a prompt-memory record (~300 KB: the previous mask's logits); a new image writes
one 2 MiB embedding and each other worker reads it once. Without diskcache installed only DiskStore runs.
"""
import multiprocessing as mp
import os
import statistics
import tempfile
import time

def make(kind, folder):
    if kind == "sqlite":
        from sam_backend.store.disk import DiskStore
        s = DiskStore(folder, max_bytes=256 << 20)
        return (lambda k, v: s.put("ns", k, v, 3600)), (lambda k: s.get("ns", k))
    import diskcache
    c = diskcache.Cache(folder, size_limit=256 << 20, eviction_policy="least-recently-used")
    return (lambda k, v: c.set(k, v, expire=3600)), (lambda k: c.get(k))

def work(kind, folder, wid, q):
    put, get = make(kind, folder)
    small = os.urandom(300 * 1024)  # a prompt-memory record: (1,256,256) float32 logits + prompt
    big = os.urandom(2 * 1024 * 1024)  # one float16 embedding
    records, puts, gets = [], [], []
    for i in range(60):
        started = time.perf_counter()
        put(f"m{wid}-{i % 8}", small)
        get(f"m{wid}-{i % 8}")
        records.append(time.perf_counter() - started)
        if i % 10 == 0:
            started = time.perf_counter()
            put(f"e{wid}-{i}", big)
            puts.append(time.perf_counter() - started)
            started = time.perf_counter()
            get(f"e{wid}-{i}")
            gets.append(time.perf_counter() - started)
        time.sleep(0.005)
    q.put((records, puts, gets))

def main() -> None:
    try:
        import diskcache  # noqa: F401
        kinds = ("sqlite", "diskcache")
    except ImportError:
        kinds = ("sqlite",)
    for kind in kinds:
        for n in (1, 8):
            run(kind, n)


def percentiles(values: list[float]) -> str:
    values = sorted(values)
    return f"p50 {statistics.median(values) * 1e3:.2f} p95 {values[int(0.95 * len(values))] * 1e3:.2f} ms"


def run(kind: str, processes: int) -> None:
    folder = tempfile.mkdtemp(prefix=kind)
    make(kind, folder)  # the schema, before the processes race to create it
    queue: mp.Queue = mp.Queue()
    workers = [mp.Process(target=work, args=(kind, folder, index, queue)) for index in range(processes)]
    for worker in workers:
        worker.start()
    results = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    records, puts, gets = ([x for r in results for x in r[part]] for part in range(3))
    print(f"{kind:9} {processes} procs | record put+get {percentiles(records)} | 2 MiB put {percentiles(puts)} | "
          f"2 MiB get {percentiles(gets)}")


if __name__ == "__main__":
    main()
