"""How to sample, declared once: the engine's defaults, and the CLI's, the server's, the report's and the page's (which
reads them from GET /api/info). No torch here, so the command line can read it before importing torch."""

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 disables
    seed: int | None = None  # None: a fresh seed each call
    n: int = 1  # samples per dial position

    def to_dict(self) -> dict:
        return asdict(self)


SAMPLING = Sampling()
