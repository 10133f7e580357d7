"""geomlab: continual CLIP training and the geometry of its representation spaces.

Importing geomlab loads neither torch nor open_clip (a command's --help and config errors answer at
once); geomlab.models registers geomlab's model configs with open_clip when it is imported."""
from . import runtime  # noqa: F401  (first: it sets OpenMP's spin count before anything loads torch)

__version__ = "0.1.0"
