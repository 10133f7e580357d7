"""geomlab: continual CLIP training and the geometry of its representation spaces."""
from . import runtime  # noqa: F401  (first: it sets OpenMP's spin count before torch loads)
from .models import register_model_configs

__version__ = "0.1.0"

register_model_configs()
