"""abcgpt: one GPT trained on several corpora, with a dial that chooses which of them it leans on."""

__all__ = ["Engine", "load", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # imported on first use, so that `abcgpt --help` and a Ctrl-C at start-up do not wait for torch
    if name == "load":
        from abcgpt.api import load

        return load
    if name == "Engine":
        from abcgpt.engine import Engine

        return Engine
    raise AttributeError(f"module 'abcgpt' has no attribute {name!r}")
