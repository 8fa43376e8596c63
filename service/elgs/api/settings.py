"""The service's settings; they live in :mod:`elgs.settings` (the one reader of ``ELGS_*``), re-exported here."""

from elgs.settings import CPU_MAX_BATCH_SIZE, CUDA_MAX_BATCH_SIZE, Settings

__all__ = ["CPU_MAX_BATCH_SIZE", "CUDA_MAX_BATCH_SIZE", "Settings"]
