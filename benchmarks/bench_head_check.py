"""The cost of the head check a masked request makes: ProfileCache.get on a cached profile,
with the check (store.head(): one Lua call on Redis, one SELECT on SQLite) and without it (the
dict lookup alone, as before the check), interleaved in rounds on a real redis-server and a
local SQLite store, the watch thread running as in the server.

    .venv/bin/python benchmarks/bench_head_check.py [--rounds 5] [--gets 2000]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from masks.cache import ProfileCache  # noqa: E402
from masks.local_store import LocalMaskStore  # noqa: E402
from masks.redis_store import RedisMaskStore  # noqa: E402
from masks.schema import MaskProfile, Provenance  # noqa: E402
from redis_support import RedisProcess  # noqa: E402


def per_get_us(cache: ProfileCache, gets: int) -> float:
    start = time.perf_counter()
    for _ in range(gets):
        cache.get("p")
    return (time.perf_counter() - start) / gets * 1e6


def measure(store, rounds: int, gets: int) -> None:
    store.put(MaskProfile(name="p", kind="manual", model_id="m", num_layers=4, num_experts=16,
                          experts={"layers": [{"layer": 0, "experts": [[1, 2]]}]},
                          provenance=Provenance(builder="bench")))
    checked = ProfileCache(store, model_id="m", poll_timeout=0.5).start()
    unchecked = ProfileCache(store, model_id="m", poll_timeout=0.5).start()
    unchecked.sync = lambda: None  # the path before the check
    for cache in (checked, unchecked):
        per_get_us(cache, 100)  # warm: cached, scripts loaded
    for r in range(rounds):
        new, old = per_get_us(checked, gets), per_get_us(unchecked, gets)
        print(f"  {type(store).__name__:15s} round {r}: with head check {new:7.1f} us/get, "
              f"without {old:5.2f} us/get, cost {new - old:6.1f} us")
    checked.close()
    unchecked.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gets", type=int, default=2000)
    args = parser.parse_args()
    print(f"{platform.node()} {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        redis_proc = RedisProcess(Path(tmp) / "redis").start()
        stores = [LocalMaskStore(Path(tmp) / "local"), RedisMaskStore.from_url(redis_proc.url)]
        try:
            for _ in range(2):  # the two stores interleaved too
                for store in stores:
                    measure(store, args.rounds, args.gets)
        finally:
            for store in stores:
                store.close()
            redis_proc.stop()


if __name__ == "__main__":
    main()
