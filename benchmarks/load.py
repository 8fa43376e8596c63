"""Service load benchmark (DESIGN 8): throughput and p50/p95/p99 latency vs concurrency, batching on and
off, the engine alone as the ceiling; prints a table, writes JSON + PNG. Same as `elgs bench service`
(the same options, elgs.cli.bench); needs `pip install 'elgs[bench]'`.

    python benchmarks/load.py                                   # starts its own servers on 127.0.0.1
    python benchmarks/load.py --url http://gpu-host:8000 --no-engine
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from elgs.cli import CommandError
from elgs.cli.bench import add_service_arguments, bench_service, require_bench_extra


def main(argv: Sequence[str] | None = None) -> int:
    try:
        require_bench_extra("benchmarks/load.py")
        from elgs.bench import service

        parser = argparse.ArgumentParser(prog="benchmarks/load.py", description=service.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        add_service_arguments(parser)
        return bench_service(parser.parse_args(argv))
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
