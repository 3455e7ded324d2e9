"""python -m golden make | dump OUT | check OUT [--stages S ...] (see golden/README.md)."""

import argparse
import os
import sys

from golden import kit


def main(argv):
    """The porting kit's command line -> the exit status (0: done, or every stage agrees)."""
    parser = argparse.ArgumentParser(prog="python -m golden", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("make", help="write the kit anew (kit.safetensors, manifest.json)")
    dump = sub.add_parser("dump", help="write swat-min's own tensors for every stage into OUT")
    dump.add_argument("out")
    check = sub.add_parser("check", help="compare a port's tensors in OUT with the kit")
    check.add_argument("out")
    check.add_argument("--stages", nargs="+", help="check only these stages (default: all)")
    args = parser.parse_args(argv)
    if args.command == "make":
        kit.make()
        print(f"wrote {kit.HERE}/kit.safetensors and manifest.json")
        return 0
    if not os.path.isdir(args.out) and args.command == "check":  # one line, not a traceback
        print(
            f"error: {args.out}: no such folder (dump a port's tensors there first)",
            file=sys.stderr,
        )
        return 2
    if args.command == "dump":
        kit.dump(args.out)
        print(f"wrote {args.out}/dump.safetensors")
        return 0
    try:
        return 1 if kit.check(args.out, stages=args.stages) else 0
    except ValueError as e:  # an unknown stage name
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
