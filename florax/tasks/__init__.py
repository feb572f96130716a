"""Built-in tasks register themselves on import."""
from florax.tasks import unicl  # noqa: F401
