"""Merge, convert and verify BOFT/OFT adapters on safetensors checkpoints.

The same code as the ``boft-merge``, ``boft-convert`` and ``boft-verify`` commands, callable from
a training script::

    import boft
    stats = boft.merge("base/", "adapter/", "merged/", force=True)
    report = boft.verify("adapter/", base="base/", merged="merged/")
    assert report["passed"]

Keyword options are the commands' long flags with ``-`` written ``_`` (``keep_replaced=True`` is
``--keep-replaced``; ``from_`` is ``--from``). docs/PYTHON.md has the details.
"""

import json as _json
import os as _os

from . import _native
from ._native import BoftError, __version__

__all__ = ["BoftError", "convert", "merge", "verify", "__version__"]

# Flags that only change how a command prints: the functions return the result instead.
_PRINT_ONLY = {"boft-verify": {"json"}}


def _text(value):
    if isinstance(value, (str, bytes, _os.PathLike)):
        return _os.fsdecode(_os.fspath(value))
    return str(value)


def _argv(program, function, options):
    """The command-line flags for keyword ``options``, checked against the command's own."""
    known = {name: (takes, repeats) for name, takes, repeats in _native.options(program)}
    argv = []
    for key, value in options.items():
        # `from` is a keyword in Python: accept `from_` (and `from` through **{"from": ...}).
        name = key[:-1] if key.endswith("_") else key
        name = name.replace("_", "-")
        if name not in known or name in _PRINT_ONLY.get(program, ()):
            raise TypeError(f"{function}() got an unexpected keyword argument {key!r}")
        takes, repeats = known[name]
        if value is None or value is False and not takes:
            continue
        if not takes:
            if value is not True:
                raise TypeError(f"{function}(): {key} is a switch: pass True or False")
            argv.append(f"--{name}")
        elif repeats and not isinstance(value, (str, bytes, _os.PathLike)):
            # `--flag=value` keeps values that start with '-' from reading as flags.
            argv.extend(f"--{name}={_text(v)}" for v in value)
        else:
            argv.append(f"--{name}={_text(value)}")
    return argv


def merge(base, adapter=None, output=None, **options):
    """Bake ``adapter`` into the checkpoint ``base`` and write ``output`` (``boft-merge``).

    ``base`` and ``adapter`` are paths or hub ids (``org/name[@revision]``, found in the local
    Hugging Face cache); ``adapter`` may be a list, applied in order, each entry optionally
    ``PATH,strength=T,mode=M``. Options: ``unmerge_adapter`` (a path or a list: taken out first,
    exactly), ``batch`` (a jobs file; then no ``adapter`` nor ``output``), ``from_``,
    ``component``, ``unmerge``, ``keep_replaced``, ``force``, ``threads``, ``device``,
    ``strength``, ``strength_mode``, ``quiet`` (no progress bar). Returns a dict with
    ``transformed``, ``replaced``, ``copied``, ``bytes`` (tensor data written), ``backend``,
    ``left_out`` (stale weight files not written) and ``outputs`` (one dict of these counts per
    output, with its ``path``). Raises BoftError.

    A split merge (docs/SCALE.md): ``plan=True`` writes nothing and adds ``plan``, the units as
    a dict (``--plan``); ``unit="K/N"`` runs worker K's share of them and adds ``units``
    (``ran``, ``skipped``: unit numbers; ``total``); ``finalize=True`` puts the output together.
    """
    argv = _argv("boft-merge", "merge", options)
    argv.append(f"--base={_text(base)}")
    if adapter is not None:
        adapters = [adapter] if isinstance(adapter, (str, bytes, _os.PathLike)) else adapter
        argv += [f"--adapter={_text(a)}" for a in adapters]
    if output is not None:
        argv.append(f"--output={_text(output)}")
    return _native.merge(argv)


def convert(input, output, **options):
    """Convert the adapter ``input`` to the canonical format, or export it (``boft-convert``).

    Options: ``to`` ("canonical", "peft", "lycoris"), ``from_``, ``base``, ``embedding`` (a
    module name or a list of them), ``compose`` (a list of adapters to compose into one, applied
    in order; then ``input`` is None), ``force``. Returns a dict with ``kind``, ``source_format``,
    ``source_version``, ``targets``, ``replaced`` and ``message`` (the command's output line).
    Raises BoftError.
    """
    argv = _argv("boft-convert", "convert", options)
    argv.append(f"--output={_text(output)}")
    if input is not None:
        argv += ["--", _text(input)]
    return _native.convert(argv)


def verify(adapters, base=None, merged=None, **options):
    """Check adapters, their fit to ``base`` and ``merged`` against base ⊕ adapter (``boft-verify``).

    ``adapters`` is one path or a list of them. Options: ``from_``, ``component``, ``restored``
    (an un-merged checkpoint to prove against ``base``), ``same_layout``, ``tolerance``,
    ``merged_tolerance``, ``checks`` ("finite,geometry" or a list of check ids). Returns the
    report (the document ``boft-verify --json`` prints) as a dict; failed checks do not raise,
    ``report["passed"]`` is False. Raises BoftError only where the command exits 2.
    """
    if isinstance(adapters, (str, bytes, _os.PathLike)):
        adapters = [adapters]
    checks = options.get("checks")
    if checks is not None and not isinstance(checks, str):
        options["checks"] = ",".join(checks)
    argv = _argv("boft-verify", "verify", options)
    if base is not None:
        argv.append(f"--base={_text(base)}")
    if merged is not None:
        argv.append(f"--merged={_text(merged)}")
    argv.append("--")
    argv.extend(_text(a) for a in adapters)
    return _json.loads(_native.verify(argv))
