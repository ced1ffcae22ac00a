"""The console scripts: each runs the command exactly as its Rust binary does."""

import sys

from . import _native


def _run(program):
    sys.exit(_native.run_command(program, sys.argv))


def merge():
    _run("boft-merge")


def convert():
    _run("boft-convert")


def verify():
    _run("boft-verify")


def extract():
    _run("boft-extract")
