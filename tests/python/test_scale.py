"""Split merges (docs/SCALE.md, issue 17): the Ray example on a local Ray instance and the Slurm
scripts under a stand-in `sbatch` that runs them as Slurm would, each against a single
boft-merge of the same inputs, byte for byte."""

import json
import os
import random
import subprocess
import sys

import boft
import pytest
from conftest import BIN, FIXTURES, REPO

BASE = FIXTURES / "resharded" / "base_llama_bf16_resharded"
ADAPTER = FIXTURES / "peft_boft" / "adapters" / "llama_bf16_f2"
ADAPTER2 = FIXTURES / "peft_boft" / "adapters" / "llama_bf16_f3_adapter_f16"


def contents(path):
    """Every file under a folder: relative name -> bytes."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


def assert_same(got, want):
    g, w = contents(got), contents(want)
    assert sorted(g) == sorted(w)
    for name in w:
        assert g[name] == w[name], f"{name} differs from the single merge"


def jobs_file(tmp, name):
    out = tmp / name
    out.mkdir()
    path = tmp / f"{name}.json"
    path.write_text(
        json.dumps(
            {
                "jobs": [
                    {"output": str(out / "one"), "adapters": [str(ADAPTER)]},
                    {"output": str(out / "two"), "adapters": [str(ADAPTER2)]},
                ]
            }
        )
    )
    return path


def env_with_bin(extra=None):
    env = dict(os.environ)
    paths = [str(p) for p in (extra or [])] + [str(BIN), env.get("PATH", "")]
    env["PATH"] = os.pathsep.join(paths)
    return env


# --- Ray -----------------------------------------------------------------------------------

def ray_example(*args):
    # CI installs Ray and sets BOFT_REQUIRE_RAY=1, so the example is never skipped there.
    if not os.environ.get("BOFT_REQUIRE_RAY"):
        pytest.importorskip("ray")
    script = REPO / "examples" / "ray" / "merge_units.py"
    r = subprocess.run(
        [sys.executable, str(script), "--num-cpus", "2", *map(str, args)],
        capture_output=True,
        text=True,
        env=env_with_bin(),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def test_ray_split_merge_is_the_single_merge(tmp_path):
    want = tmp_path / "want"
    boft.merge(BASE, ADAPTER, want, quiet=True)
    # One task per unit (four shards: four tasks), then three tasks for four units.
    for workers in [None, 3]:
        got = tmp_path / f"got{workers}"
        extra = ["--workers", workers] if workers else []
        r = ray_example("--base", BASE, "--adapter", ADAPTER, "-o", got, *extra)
        assert f"merged {got}" in r.stderr
        assert_same(got, want)
        assert not (tmp_path / f".got{workers}.boft-units").exists()


def test_ray_fleet_is_the_batch_merge(tmp_path):
    want, got = jobs_file(tmp_path, "want"), jobs_file(tmp_path, "got")
    boft.merge(BASE, batch=want, quiet=True)
    plan = boft.merge(BASE, batch=got, plan=True)["plan"]
    assert plan["units_total"] == 8, "two outputs × four files: eight tasks"
    ray_example("--base", BASE, "--batch", got)
    for job in ["one", "two"]:
        assert_same(tmp_path / "got" / job, tmp_path / "want" / job)


# --- Slurm ---------------------------------------------------------------------------------

# A stand-in for `sbatch`: runs the script at once, array tasks in a random order, with the
# variables Slurm sets for them; a job with --dependency=afterok:ID runs only if every task of
# ID succeeded (else it never runs, as Slurm leaves it pending). Prints the job id (--parsable).
FAKE_SBATCH = r'''#!/usr/bin/env python3
import json, os, random, subprocess, sys
state = os.environ["FAKE_SLURM_STATE"]
args = sys.argv[1:]
array = dep = None
while args and args[0].startswith("--"):
    a = args.pop(0)
    if a.startswith("--array="):
        lo, hi = a.split("=", 1)[1].split("-")
        array = (int(lo), int(hi))
    elif a.startswith("--dependency="):
        kind, job = a.split("=", 1)[1].split(":")
        assert kind == "afterok", kind
        dep = job
    elif a != "--parsable":
        sys.exit(f"fake sbatch: option {a} not simulated")
script, rest = args[0], args[1:]
jobs = json.load(open(state)) if os.path.exists(state) else {}
job = str(1000 + len(jobs))
codes = []
with open(script) as f:
    assert f.readline().startswith("#!"), "not a batch script"
if dep is not None and not all(c == 0 for c in jobs[dep]):
    codes = [None]
elif array:
    ids = list(range(array[0], array[1] + 1))
    random.shuffle(ids)
    ids.append(ids[0])  # one task requeued: it runs twice
    for i in ids:
        env = dict(os.environ, SLURM_JOB_ID=job, SLURM_ARRAY_JOB_ID=job,
                   SLURM_ARRAY_TASK_ID=str(i), SLURM_ARRAY_TASK_MIN=str(array[0]),
                   SLURM_ARRAY_TASK_MAX=str(array[1]),
                   SLURM_ARRAY_TASK_COUNT=str(array[1] - array[0] + 1),
                   SLURM_CPUS_PER_TASK="1")
        codes.append(subprocess.call(["bash", script, *rest], env=env))
else:
    env = dict(os.environ, SLURM_JOB_ID=job)
    codes.append(subprocess.call(["bash", script, *rest], env=env))
jobs[job] = codes
json.dump(jobs, open(state, "w"))
print(job)
'''


def fake_slurm(tmp):
    bindir = tmp / "fake-bin"
    bindir.mkdir()
    sbatch = bindir / "sbatch"
    sbatch.write_text(FAKE_SBATCH)
    sbatch.chmod(0o755)
    state = tmp / "slurm-state.json"
    env = env_with_bin([bindir])
    env["FAKE_SLURM_STATE"] = str(state)
    return env, state


def submit(env, *args):
    r = subprocess.run(
        ["bash", str(REPO / "examples" / "slurm" / "submit.sh"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def test_slurm_array_then_finalize_is_the_single_merge(tmp_path):
    random.seed(17)
    env, state = fake_slurm(tmp_path)
    want = tmp_path / "want"
    boft.merge(BASE, ADAPTER, want, quiet=True)
    for workers in [None, 1, 2, 3]:
        got = tmp_path / f"got{workers}"
        extra = ["--workers", workers] if workers else []
        submit(env, *extra, "--base", BASE, "--adapter", ADAPTER, "-o", got)
        jobs = json.loads(state.read_text())
        array, final = list(jobs)[-2:]
        # One task per unit by default; each ran (one of them twice) and succeeded.
        assert len(jobs[array]) == (workers or 4) + 1
        assert all(c == 0 for c in jobs[array] + jobs[final])
        assert_same(got, want)


def test_slurm_fleet_runs_a_task_per_output_file(tmp_path):
    env, state = fake_slurm(tmp_path)
    want, got = jobs_file(tmp_path, "want"), jobs_file(tmp_path, "got")
    boft.merge(BASE, batch=want, quiet=True)
    submit(env, "--base", BASE, "--batch", got)
    array = list(json.loads(state.read_text()))[0]
    assert len(json.loads(state.read_text())[array]) == 8 + 1
    for job in ["one", "two"]:
        assert_same(tmp_path / "got" / job, tmp_path / "want" / job)


def test_slurm_finalize_fails_on_a_missing_unit_and_moves_nothing(tmp_path):
    env, _ = fake_slurm(tmp_path)
    out = tmp_path / "out"
    # Worker 1 of 2 only, as if worker 0 had been cancelled; then the finalize job's command.
    task = dict(env, SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX="1")
    unit = REPO / "examples" / "slurm" / "unit.sbatch"
    args = ["--base", str(BASE), "--adapter", str(ADAPTER), "-o", str(out)]
    subprocess.run(["bash", str(unit), *args], env=task, check=True, timeout=600)
    final = REPO / "examples" / "slurm" / "finalize.sbatch"
    r = subprocess.run(["bash", str(final), *args], env=env, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "[units-incomplete]" in r.stderr, r.stderr
    assert not out.exists()
    # The missing worker run again, then finalize: done.
    task["SLURM_ARRAY_TASK_ID"] = "0"
    subprocess.run(["bash", str(unit), *args], env=task, check=True, timeout=600)
    subprocess.run(["bash", str(final), *args], env=env, check=True, timeout=600)
    want = tmp_path / "want"
    boft.merge(BASE, ADAPTER, want, quiet=True)
    assert_same(out, want)
