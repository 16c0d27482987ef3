"""The former home of the memory-bank domain code, now `app.banks`; kept while bench/ scripts import it from here."""

from app.banks import *  # noqa: F403
from app.banks import __all__  # noqa: F401
