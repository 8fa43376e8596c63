"""Benchmarks (design.md, section 8), behind the ``bench`` extra: ``pip install 'elgs[bench]'``.

One module per ``elgs bench`` command (``benchmarks/*.py`` call the same commands):

- :mod:`elgs.bench.defenses`: defence-op time over model-pass time per method, and ``/defend/slgs``
  latency per saliency estimator (``elgs bench defenses``).
- :mod:`elgs.bench.service`: HTTP throughput and latency against the hardware's floor
  (``elgs bench service``, ``benchmarks/load.py``); needs httpx and matplotlib.
- :mod:`elgs.bench.robustness`: the figures of ``attack eval`` through a running service
  (``elgs bench robustness``); needs httpx.
- :mod:`elgs.bench.flood`: a queue flood against a running service (``elgs bench flood``).
- :mod:`elgs.bench.placement`: where a model's torch ops should run (``elgs bench placement``).
- :mod:`elgs.bench.precision`: the autocast dtypes against float32 (``elgs bench precision``).
- :mod:`elgs.bench.estimators`: saliency estimators and WLGS weightings (``elgs bench estimators``).
- :mod:`elgs.bench.saliency_probe`: where the saliency sits on patched images (``elgs bench saliency-probe``).
- :mod:`elgs.bench.through_cost`: one training step through each defence (``elgs bench through``).

Importing this package imports nothing else (it holds constants): import the module you need.
Their command-line options live in :mod:`elgs.cli.bench`, so ``elgs --help`` works without the extra.
"""

# Constants the CLI builds its options from without importing the benchmarks (httpx, torch).
CONCURRENCY_LEVELS = (1, 2, 4, 8, 16, 32)
PLACEMENTS = ("main", "split", "split+decode", "worker", "worker+loaded", "process")
ESTIMATORS = (
    "gradient",
    "gradient:rectify=true",
    "smoothgrad:n=4,sigma=0.2",
    "smoothgrad:n=4,sigma=0.2,rectify=true",
    "smoothgrad:n=4,sigma=0.1,rectify=true",
    "smoothgrad:n=4,sigma=0.3,rectify=true",
    "smoothgrad:n=8,sigma=0.2,rectify=true",
)
