"""`abcgpt calibrate`: measure the style curve along the dial in one mode, fit share -> dial, and store the fit
(with its mode) in the checkpoint (checkpoint.write_calibration)."""

from contextlib import nullcontext
from pathlib import Path

from abcgpt.checkpoint import load_checkpoint, write_calibration
from abcgpt.common import AbcgptError, check_writable, run_lock
from abcgpt.dial import dial_path, even
from abcgpt.engine import Engine
from abcgpt.report import heldout_data
from abcgpt.report_metrics import Settings, fit_classifier, sample_style
from abcgpt.style import fit_calibration


def calibrate(ckpt_path: Path, settings: Settings | None = None, device="cpu", progress: bool = True,
              mode: str | None = None) -> dict:
    """Measure the style curve in one mode, fit share -> dial, and store it (with its mode) in the checkpoint's
    config.json."""
    s = settings or Settings()
    ckpt = load_checkpoint(ckpt_path, device)
    engine = Engine(ckpt)
    mode = engine.mode(mode)
    if len(ckpt.sources) != 2:
        raise AbcgptError("calibration maps a share of the second source to a dial position: it needs two sources")
    engine.prompt_ids(s.prompt)  # the checks first, then minutes of work
    check_writable(ckpt.path)
    # a run's checkpoint is rewritten by its trainer: hold the run (no trainer starts) until ours is written
    with run_lock(ckpt.run) if ckpt.run is not None else nullcontext():
        data = heldout_data(ckpt)
        clf = fit_classifier(data, s)
        ts = even(s.style_points)
        if progress:
            print(f"measuring the style curve: {s.samples} samples x {s.style_points} positions")
        style = sample_style(engine, clf, dial_path(2, ts), mode, s)
        shares = [row[-1] for row in style.share]
        cal = fit_calibration(ts, shares) | {"mode": mode, "curve": {"dial": ts, "share": shares},
                                             "samples_per_point": s.samples,
                                             "new_tokens": s.new_tokens, "classifier_accuracy": clf.accuracy}
        written = write_calibration(ckpt, cal)
    if progress:
        print(f"calibration stored in {' and '.join(str(p) for p in written)}")
    return cal
