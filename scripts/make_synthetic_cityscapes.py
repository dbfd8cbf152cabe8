"""Write the synthetic Cityscapes data set (official layout) that the project trains on by default.

    .venv/bin/python scripts/make_synthetic_cityscapes.py                 # the default set, if absent
    .venv/bin/python scripts/make_synthetic_cityscapes.py --out /tmp/cs --train 100 --val 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from seg.data.synthetic import DEFAULT_SYNTHETIC, default_synthetic_root, ensure_synthetic_cityscapes
from seg.errors import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default_synthetic_root(),
                        help="output directory (default: %(default)s, the set used when data.root is null)")
    parser.add_argument("--train", type=int, default=DEFAULT_SYNTHETIC["train"], help="training images")
    parser.add_argument("--val", type=int, default=DEFAULT_SYNTHETIC["val"], help="validation images")
    parser.add_argument("--test", type=int, default=0, help="test images")
    parser.add_argument("--height", type=int, default=DEFAULT_SYNTHETIC["height"], help="image height")
    parser.add_argument("--width", type=int, default=DEFAULT_SYNTHETIC["width"], help="image width")
    parser.add_argument("--seed", type=int, default=DEFAULT_SYNTHETIC["seed"], help="random seed")
    parser.add_argument("--force", action="store_true", help="replace a synthetic set made with other parameters")
    args = parser.parse_args(argv)

    parameters = dict(train=args.train, val=args.val, test=args.test, height=args.height, width=args.width,
                      seed=args.seed)
    described = (f"{args.train} train, {args.val} val, {args.test} test images of "
                 f"{args.height}x{args.width}, seed {args.seed}")
    out = args.out.expanduser().resolve()
    started = time.perf_counter()
    try:
        written = ensure_synthetic_cityscapes(out, force=args.force, **parameters)
    except (DataError, ValueError) as error:
        print(f"make_synthetic_cityscapes: {error}", file=sys.stderr)
        return 1
    if not written:
        print(f"{out} already holds the synthetic set ({described}); nothing to do. Use --force to rewrite it.")
        return 0
    print(f"wrote {described} to {out} in {time.perf_counter() - started:.1f} s")
    print(f"  {out}/leftImg8bit/<split>/<city>/*_leftImg8bit.png")
    print(f"  {out}/gtFine/<split>/<city>/*_gtFine_{{labelIds,instanceIds,color}}.png, *_gtFine_polygons.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
