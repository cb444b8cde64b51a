"""scripts/morph_floor.py: turns cut from a corner's text, and samples dealt from them in the dial's shares."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from morph_floor import deal, turns_of  # noqa: E402


def test_turns_are_sentences_and_lines_long_enough_to_read():
    text = ("Once upon a time there was a cat. It ran. Then the cat went to the park.\nANGELO:\n"
            "My noble lord, what say you now?\n        path = os.path.join(base, name)\n")
    assert turns_of(text) == ["Once upon a time there was a cat.", "Then the cat went to the park.",
                              "My noble lord, what say you now?", "path = os.path.join(base, name)"]


def test_deal_gives_each_corner_its_share_of_turns_on_lines_of_their_own():
    a, b, c = (["x" * 24 + str(i) for i in range(20)] for _ in range(3))
    b = [t.replace("x", "y") for t in b]
    c = [t.replace("x", "z") for t in c]
    sample = deal([a, b, c], torch.tensor([0.25, 0.75, 0.0]), chars=26 * 8)
    lines = sample.split("\n")
    assert len(lines) == 8 and all(len(x) == 25 for x in lines)
    assert [x[0] for x in lines].count("x") == 2 and [x[0] for x in lines].count("y") == 6  # 1 : 3, no "z"
    assert [x for x in lines if x[0] == "y"] == b[:6]  # each corner's turns in their order
    assert len(deal([a, b, c], torch.tensor([0.5, 0.5, 0.0]), chars=100)) == 100  # cut at the sample's length


def test_deal_ends_the_sample_when_a_corner_has_no_turn_left():
    sample = deal([["a" * 30], ["b" * 30] * 5], torch.tensor([0.5, 0.5]), chars=1000)
    assert sample.split("\n") == ["a" * 30, "b" * 30]
