"""How much of the network a dial position lights up, against the number of sources (DESIGN.md §4).

For N sources and a specialty concentration c, draws 20,000 units with Dirichlet(c) specialties and prints
the mean gate and the share of units with gate > 0.5 at a corner (one source alone), at the middle of an
edge (two sources half and half) and at the centroid (all sources equally).

    python scripts/simplex_capacity.py
"""

import torch

from abcgpt.dial import draw_specialties, gate


def main() -> None:
    print(f"{'N':>3} {'c':>7} | {'corner mean':>11} {'>0.5':>6} | {'edge mean':>9} {'>0.5':>6} | "
          f"{'centroid mean':>13} {'>0.5':>6}")
    for n in (2, 3, 4, 8, 16):
        for label, c in (("0.5", 0.5), ("1/N", 1.0 / n)):
            if n == 2 and label == "1/N":
                continue  # the same as 0.5
            spec = draw_specialties(20_000, n, seed=0, concentration=c)
            corner = torch.zeros(n)
            corner[0] = 1.0
            edge = torch.zeros(n)
            edge[:2] = 0.5
            centroid = torch.full((n,), 1.0 / n)
            cells = []
            for dial in (corner, edge, centroid):
                g = gate(dial[None], spec)[0]
                cells.append((g.mean().item(), (g > 0.5).float().mean().item()))
            print(f"{n:>3} {label:>7} | {cells[0][0]:>11.3f} {cells[0][1]:>6.3f} | {cells[1][0]:>9.3f} "
                  f"{cells[1][1]:>6.3f} | {cells[2][0]:>13.3f} {cells[2][1]:>6.3f}")


if __name__ == "__main__":
    main()
