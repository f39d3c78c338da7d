#!/usr/bin/env python
"""Vanishing and exploding gradients, measured with the NumPy reference's hand-written BPTT.

    python scripts/bptt_demo.py [--steps 62] [--hidden_size 64] [--seed 0] [--plot gradient_flow.png [--overwrite]]

For freshly initialized one-layer models it prints how much of the gradient of the last prediction reaches the
hidden state k steps earlier, and the global gradient norm of a whole-sequence loss before and after clipping;
--plot draws both as a PNG (matplotlib), refusing to replace a file that exists unless --overwrite is given.
"""

import argparse
import os
import sys

from char_lstm.numpy_reference import gradient_flow_demo, plot_gradient_flow


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=62)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_norm", type=float, default=1.0)
    parser.add_argument("--plot", metavar="PNG", help="also draw the figure into this PNG file (a new file)")
    parser.add_argument("--overwrite", action="store_true", help="let --plot replace a file that exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.plot and os.path.exists(args.plot) and not args.overwrite:  # before any work: nothing lost silently
        print(f"error: --plot {args.plot} exists; choose another file, or pass --overwrite to replace it.",
              file=sys.stderr)
        return 2
    rows = gradient_flow_demo(hidden_size=args.hidden_size, steps=args.steps, seed=args.seed, max_norm=args.max_norm)
    back = [k for k in (0, 10, 20, 40, 60) if k < args.steps - 1]
    print(f"{'model':<28}" + "".join(f"{f'{k} back':>10}" for k in back) + f"{'grad norm':>12}{'clipped':>10}")
    for row in rows:
        norms = "".join(f"{row['norms_back'][k]:>10.1e}" for k in back)
        print(f"{row['model']:<28}{norms}{row['grad_norm']:>12.2e}{row['clipped_norm']:>10.2f}")
    if args.plot:
        plot_gradient_flow(rows, args.plot, args.max_norm)
        print(f"figure: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
