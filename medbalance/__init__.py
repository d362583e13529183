"""medbalance: imbalanced medical image classification on Ray.

The distribution's top-level packages are ``shards`` (dataset format), ``models``, ``losses``,
``gan``, ``metrics`` and ``ray_jobs``; this package holds what they share: the version and the
project's error types.
"""
from medbalance.errors import MedbalanceError

__version__ = "0.1.0"
__all__ = ["MedbalanceError", "__version__"]
