"""Benchmarks (design.md, section 8), behind the ``bench`` extra: ``pip install 'elgs[bench]'``.

- :mod:`elgs.bench.defenses`: defence-op time over model-pass time per method, and ``/defend/slgs``
  latency per saliency estimator (``elgs bench defenses``, ``benchmarks/defenses.py``).
- :mod:`elgs.bench.service`: HTTP throughput and latency against the hardware's floor
  (``elgs bench service``, ``benchmarks/load.py``); needs httpx and matplotlib.

Importing this package imports nothing else (it holds one constant): import the module you need.
Their command-line options live in :mod:`elgs.cli.bench`, so ``elgs --help`` works without the extra.
"""

# Concurrency levels of the service benchmark, here so the CLI builds its options without httpx.
CONCURRENCY_LEVELS = (1, 2, 4, 8, 16, 32)
