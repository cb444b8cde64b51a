"""abcgpt: one GPT trained on several corpora, with a dial that chooses which of them it leans on."""

__version__ = "0.1.0"
