"""python -m golden make | dump OUT | check OUT (see golden/README.md)."""

import sys

from golden import kit

USAGE = "usage: python -m golden make | dump OUT_DIR | check OUT_DIR"


def main(argv):
    if argv[:1] == ["make"] and len(argv) == 1:
        kit.make()
        print(f"wrote {kit.HERE}/kit.safetensors and manifest.json")
        return 0
    if argv[:1] in (["dump"], ["check"]) and len(argv) == 2:
        if argv[0] == "dump":
            kit.dump(argv[1])
            print(f"wrote {argv[1]}/dump.safetensors")
            return 0
        return 1 if kit.check(argv[1]) else 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
