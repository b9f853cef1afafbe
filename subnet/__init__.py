"""subnet: train timm models with submodel methods (cosub, ST, ST++, GKT)."""
from .errors import UsageError

__version__ = '0.1.0'
