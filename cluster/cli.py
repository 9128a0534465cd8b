"""The `pdserve` command line."""
import sys


def main(argv: list[str] | None = None) -> int:
    print("pdserve: under construction", file=sys.stderr)
    return 1
