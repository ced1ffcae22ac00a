"""Run one boft-merge (or a batch of them) as Ray tasks: plan, one task per share of the units,
finalize (docs/SCALE.md).

    python examples/ray/merge_units.py --base BASE --adapter ADAPTER -o OUT [--workers N]
    python examples/ray/merge_units.py --base BASE --batch jobs.json      # a fleet

Every task runs ``boft.merge(..., unit="K/N")`` in a Ray worker: the `boft` package (``pip
install boft-*.whl``) must be importable there, and every node must see the base, the adapters
and the output's folder at the same paths (a shared filesystem). With ``--address`` the driver
joins an existing cluster; without it, it starts a local one (``--num-cpus``).

A unit is one output file: one file of the base, merged for one job. By default there is one
task per unit, so a batch of J jobs over a base of F files runs J × F tasks, one per (adapter
set, output file). ``--workers N`` groups them into N tasks instead (the split boft-merge itself
computes: largest units first, each to the least-loaded worker).
"""

import argparse
import sys

import boft
import ray


@ray.remote(num_cpus=1)
def run_share(base, adapters, output, share, options):
    """One worker's share of the units; returns which units it wrote and which were done."""
    import boft  # imported in the worker process

    done = boft.merge(base, adapters, output, unit=share, threads=1, quiet=True, **options)
    return done["units"]


def merge(base, adapter=None, output=None, workers=None, **options):
    """Plan, run every share as a Ray task, wait for all, finalize. ``adapter``/``output`` as for
    ``boft.merge``; for a batch pass ``batch=JOBS`` instead. Returns what ``--finalize`` returns
    (the counts of every output)."""
    plan = boft.merge(base, adapter, output, plan=True, **options)["plan"]
    n = workers or plan["units_total"]
    tasks = [run_share.remote(base, adapter, output, f"{k}/{n}", options) for k in range(n)]
    ran = sorted(u for r in ray.get(tasks) for u in r["ran"] + r["skipped"])
    if ran != list(range(plan["units_total"])):
        raise RuntimeError(f"units {ran} ran, expected 0..{plan['units_total'] - 1}")
    return boft.merge(base, adapter, output, finalize=True, quiet=True, **options)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", action="append", help="repeatable, applied in order")
    p.add_argument("-o", "--output")
    p.add_argument("--batch", help="a jobs file (boft-merge --batch) instead of --adapter/-o")
    p.add_argument("--workers", type=int, help="tasks to split into (default: one per unit)")
    p.add_argument("--address", help="a Ray cluster to join (default: start a local one)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local cluster")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    a = p.parse_args(argv)
    if bool(a.batch) == bool(a.adapter or a.output):
        p.error("give --adapter and -o, or --batch")
    if a.address:
        ray.init(address=a.address)
    else:
        ray.init(num_cpus=a.num_cpus)
    options = {"force": True} if a.force else {}
    if a.batch:
        options["batch"] = a.batch
    done = merge(a.base, a.adapter, a.output, a.workers, **options)
    for o in done["outputs"]:
        print(
            f"merged {o['path']}: {o['transformed']} tensors transformed, {o['replaced']} "
            f"replaced, {o['copied']} copied",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
