"""Pure batched tensor ops of the defences (design.md, section 2); imports only torch (and Pillow for JPEG).

Public API (stable): ``local_gradient_map``, ``saliency_region``, ``smooth``, ``topk_saliency``,
the transforms ``lgs``/``slgs``/``wlgs``, the saliency estimators (``ESTIMATORS``, ``parse_saliency``,
``saliency_pass``), the baselines ``jpeg``/``median``/``gaussian`` and the
registry ``DEFENSES`` / ``get_defense``.
"""

from elgs.defenses.estimators import (
    ESTIMATORS,
    PassOne,
    SaliencyConfig,
    SaliencyEstimator,
    estimate_saliency,
    estimator_names,
    get_estimator,
    parse_saliency,
    rectified_activations,
    robust_normalize,
    saliency_pass,
)
from elgs.defenses.filters import gaussian, jpeg, median
from elgs.defenses.gradients import block_filter, local_gradient_map, minmax_normalize, sobel_magnitude
from elgs.defenses.morphology import dilate, erode, saliency_region
from elgs.defenses.registry import (
    DEFAULT_THRESHOLD,
    DEFENSES,
    LAMBDA_RANGE,
    REMOVAL_FILL_SIGMA,
    THRESHOLD_RANGE,
    Defense,
    DefenseInput,
    DefenseOutput,
    defense_names,
    get_defense,
    register,
)
from elgs.defenses.saliency import saliency_from_loss, topk_loss, topk_saliency
from elgs.defenses.smoothing import fill_from_surroundings, fill_with_own_mean, smooth, smooth_pixels, suppression
from elgs.defenses.transforms import lgs, lgs_mask, slgs, slgs_mask, wlgs, wlgs_mask

__all__ = [
    "ESTIMATORS", "PassOne", "SaliencyConfig", "SaliencyEstimator", "estimate_saliency", "estimator_names",
    "get_estimator", "parse_saliency", "rectified_activations", "robust_normalize", "saliency_pass",
    "DEFAULT_THRESHOLD", "DEFENSES", "LAMBDA_RANGE", "REMOVAL_FILL_SIGMA", "THRESHOLD_RANGE", "Defense", "DefenseInput",
    "DefenseOutput", "block_filter", "defense_names", "dilate", "erode", "fill_from_surroundings", "fill_with_own_mean", "gaussian", "get_defense", "jpeg",
    "lgs", "lgs_mask", "local_gradient_map", "median", "minmax_normalize", "register", "saliency_from_loss",
    "saliency_region", "slgs", "slgs_mask", "smooth", "smooth_pixels", "sobel_magnitude", "suppression", "topk_loss",
    "topk_saliency", "wlgs", "wlgs_mask",
]
