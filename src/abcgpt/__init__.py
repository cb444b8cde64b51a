"""abcgpt: one GPT trained on several corpora, with a dial that chooses which of them it leans on."""

from abcgpt.api import load
from abcgpt.engine import Engine

__all__ = ["Engine", "load", "__version__"]
__version__ = "0.1.0"
