"""Do the DANN model's target-domain maps become more faithful during training?

The digits demo (`dann_digits.py`: source-only and DANN, default settings, seed 0), watched at
``features.conv4`` with Grad-CAM and every faithfulness measure plus the sanity check; prints,
per run and evaluation, the target probe's mean drop, increase, deletion, insertion and sanity
as the history recorded them. Results: benchmarks/results/faithfulness-digits.md.

    python examples/digits_faithfulness.py --log-dir runs/digits-faith
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dann_digits as digits

from cam_monitor.history import find_history, read_history
from cam_monitor.schema import FAITHFULNESS, FAITHFULNESS_CHOICES, MapKey, ScalarKey

LAYER = "features.conv4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", type=Path, default=Path("runs/digits-faith"))
    parser.add_argument("--epochs", type=int, default=8)
    given = parser.parse_args()
    data = digits.make_digits()
    for adapt in (False, True):
        name = "dann" if adapt else "source_only"
        argv = ["--log-dir", str(given.log_dir / name), "--epochs", str(given.epochs)]
        args = digits.parse_args(argv + (["--adapt"] if adapt else []))
        digits.pl.seed_everything(args.seed, workers=True, verbose=False)
        module = digits.build_module(args.adapt, args.seed, args.lr)
        loaders = digits.build_loaders(data, args.batch_size, args.steps_per_epoch, args.seed)
        monitor = digits.build_monitor(
            data, layer=LAYER, methods=["gradcam"], faithfulness=FAITHFULNESS_CHOICES
        )
        logger = digits.make_logger(args.logger, args.log_dir, name)
        result = digits.fit_run(args, module, monitor, logger, loaders, name, args.log_dir)
        print(f"\n{name}: target accuracy {result['target_acc']:.3f}")
        print("| epoch | " + " | ".join(FAITHFULNESS_CHOICES) + " |")
        print("|---" * (len(FAITHFULNESS_CHOICES) + 1) + "|")
        for evaluation in read_history(find_history(args.log_dir)):
            keys = [
                ScalarKey(FAITHFULNESS, MapKey("target", LAYER, "gradcam"), stat).tag
                for stat in FAITHFULNESS_CHOICES
            ]
            cells = [f"{evaluation.scalars.get(key, float('nan')):.3f}" for key in keys]
            print(f"| {evaluation.epoch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
