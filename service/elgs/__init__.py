"""elgs: Local Gradients Smoothing (LGS, SLGS, WLGS) against adversarial patches, as a library,
a CLI and a REST service."""

__version__ = "0.1.0"
