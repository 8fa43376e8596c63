"""Service load benchmark (DESIGN 8): throughput and p50/p95/p99 latency vs concurrency, batching on and
off, the engine alone as the ceiling; prints a table, writes JSON + PNG. Same as `elgs bench service`.

    python benchmarks/load.py                                   # starts its own servers on 127.0.0.1
    python benchmarks/load.py --url http://gpu-host:8000 --no-engine
"""

import sys

from elgs.bench.service import main

if __name__ == "__main__":
    sys.exit(main())
