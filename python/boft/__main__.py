"""``python -m boft install-completions [--prefix DIR]``: man pages and shell completions."""

import argparse
import os
import sys

from . import BoftError, _native


def _default_prefix():
    # In a virtual environment its own prefix (man and the shells find it through its bin/ on
    # PATH); otherwise the user's, which needs no root.
    if sys.prefix != sys.base_prefix:
        return sys.prefix
    return os.path.join(os.path.expanduser("~"), ".local")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m boft")
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser(
        "install-completions",
        help="write man pages and bash/zsh/fish completions for the three commands",
    )
    install.add_argument(
        "--prefix",
        default=None,
        help="install under DIR/share (default: the virtual environment, else ~/.local)",
    )
    args = parser.parse_args(argv)
    try:
        files = _native.install_completions(args.prefix or _default_prefix())
    except BoftError as e:
        print(e, file=sys.stderr)
        return 2
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
