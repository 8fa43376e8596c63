"""One router per resource; the inference and catalogue routers need the API key, health, metrics and the page not."""

from elgs.api.routes import classify, defend, defenses, health, metrics, models, page, saliency

PROTECTED_ROUTERS = (classify.router, defend.router, saliency.router, models.router, defenses.router)
OPEN_ROUTERS = (health.router, metrics.router, page.router)
# Routes the in-flight limit lets through (cheap, and probes must answer under a flood).
UNLIMITED_ROUTERS = (health.router, metrics.router)
# Routes that upload an image to a model's queue (admitted before the body arrives).
INFERENCE_ROUTERS = (classify.router, defend.router, saliency.router)
