"""geomlab: continual CLIP training and the geometry of its representation spaces."""
from .models import register_model_configs

__version__ = "0.1.0"

register_model_configs()
