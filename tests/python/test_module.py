"""The boft module: merge, convert and verify on the fixtures, and BoftError."""

import json
import os
import subprocess

import pytest

import boft
from conftest import BIN, PEFT, assert_merge_matches, base_path, expected_path, f32_cases
from conftest import out_path, tensors


@pytest.mark.parametrize("case", f32_cases(), ids=lambda c: c["name"])
def test_merge_matches_peft_merge_and_unload(case, tmp_path):
    base = base_path(case)
    out = out_path(tmp_path, base)
    stats = boft.merge(base, PEFT / case["adapter"], out)
    assert stats["transformed"] > 0
    assert stats["transformed"] + stats["replaced"] + stats["copied"] == len(tensors(base))
    assert stats["backend"] == "cpu"
    assert_merge_matches(out, expected_path(case), base)


def test_verify_proves_the_merge(llama, tmp_path):
    base, adapter, _ = llama
    out = tmp_path / "merged"
    boft.merge(str(base), str(adapter), str(out), threads=2, quiet=True)
    report = boft.verify(adapter, base=base, merged=out)
    assert report["passed"] is True, report["failed"]
    assert report["failed"] == []
    assert report["merged"]["transformed"] > 0
    assert any(c["check"] == "merged-values" and c["status"] == "pass" for c in report["checks"])


def test_verify_returns_a_failing_report_without_raising(llama):
    base, adapter, _ = llama
    other = PEFT / "merged/llama_f32_f1"
    report = boft.verify([adapter], base=base, merged=other)
    assert report["passed"] is False
    assert any(f.startswith("merged-values") for f in report["failed"]), report["failed"]
    # The same report the command prints with --json, whose exit code is then 1.
    o = subprocess.run(
        [BIN / "boft-verify", adapter, "--base", base, "--merged", other, "--json"],
        capture_output=True,
        text=True,
    )
    assert o.returncode == 1, o.stderr
    cli = json.loads(o.stdout)
    assert cli["failed"] == report["failed"]
    assert [c["check"] for c in cli["checks"]] == [c["check"] for c in report["checks"]]


def test_checks_and_from_options(llama):
    _, adapter, _ = llama
    report = boft.verify(adapter, checks=["finite", "geometry"], from_="peft")
    assert report["passed"] is True
    assert {c["check"] for c in report["checks"]} == {"finite", "geometry"}
    same = boft.verify(adapter, checks="finite,geometry", **{"from": "peft"})
    assert same["checks"] == report["checks"]


def test_strength_options_mean_the_flags(llama, tmp_path):
    base, adapter, expected = llama
    out = tmp_path / "half"
    boft.merge(base, adapter, out, strength=0.5, strength_mode="per-factor")
    o = subprocess.run(
        [BIN / "boft-merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "cli",
         "--strength", "0.5", "--strength-mode", "per-factor"],
        capture_output=True,
        text=True,
    )
    assert o.returncode == 0, o.stderr
    half, cli, full = tensors(out), tensors(tmp_path / "cli"), tensors(expected)
    assert {n: t.tobytes() for n, (_, t) in half.items()} == {
        n: t.tobytes() for n, (_, t) in cli.items()
    }
    assert any(half[n][1].tobytes() != full[n][1].tobytes() for n in half), "strength ignored"
    # A negative value travels as --strength=-1 and is taken as a number, not as a flag.
    boft.merge(base, adapter, tmp_path / "neg", strength=-1.0)
    neg = tensors(tmp_path / "neg")
    assert any(neg[n][1].tobytes() != half[n][1].tobytes() for n in neg)


def test_unmerge_restores_the_base(llama, tmp_path):
    base, adapter, expected = llama
    boft.merge(expected, adapter, tmp_path / "back", unmerge=True)
    back = tensors(tmp_path / "back")
    orig = tensors(base)
    assert sorted(back) == sorted(orig)
    for name, (_, t) in back.items():
        b = orig[name][1]
        scale = max(float(abs(b).max()), 1e-30)
        assert float(abs(t.astype("float64") - b).max()) / scale <= 2e-5, name


def test_convert_to_canonical_then_merge(llama, tmp_path):
    base, adapter, expected = llama
    canon = tmp_path / "a.safetensors"
    done = boft.convert(adapter, canon)
    assert done["kind"] == "canonical"
    assert done["targets"] > 0
    assert done["message"].startswith(f"wrote {canon}: {done['targets']} targets")
    assert boft.verify(canon)["passed"] is True
    boft.merge(base, canon, tmp_path / "m")
    assert_merge_matches(tmp_path / "m", expected, base)


def test_missing_input_raises_with_its_class_and_writes_nothing(llama, tmp_path):
    base, _, _ = llama
    missing = tmp_path / "no-such-adapter"
    out = tmp_path / "out"
    with pytest.raises(boft.BoftError) as e:
        boft.merge(base, missing, out)
    assert e.value.error_class == "not-found"
    assert e.value.path == str(missing)
    # str(e) is the command's own stderr line.
    assert str(e.value).startswith("boft-merge: error[not-found] ")
    assert os.listdir(tmp_path) == []
    o = subprocess.run(
        [BIN / "boft-merge", "--base", base, "--adapter", missing, "-o", out],
        capture_output=True,
        text=True,
    )
    assert o.returncode == 2
    assert o.stderr == str(e.value) + "\n"


def test_existing_output_needs_force(llama, tmp_path):
    base, adapter, expected = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(boft.BoftError) as e:
        boft.merge(base, adapter, out)
    assert e.value.error_class == "output-exists"
    assert (out / "keep").read_text() == "x"
    boft.merge(base, adapter, out, force=True)
    assert_merge_matches(out, expected, base)


@pytest.mark.parametrize(
    "options",
    [
        {"strength": "abc"},
        {"keep_replaced": True},  # needs unmerge
        {"strength_mode": "sideways"},
        {"threads": 0},
        {"from_": "nonsense"},
    ],
)
def test_bad_option_values_are_usage_errors(llama, tmp_path, options):
    base, adapter, _ = llama
    with pytest.raises(boft.BoftError) as e:
        boft.merge(base, adapter, tmp_path / "out", **options)
    assert e.value.error_class == "usage"
    assert e.value.path is None
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_verify_usage_error_is_raised(llama):
    base, adapter, expected = llama
    with pytest.raises(boft.BoftError) as e:
        boft.verify([adapter, adapter], base=base, merged=expected)
    assert e.value.error_class == "usage"
    assert "--merged/--restored need --base and exactly one adapter" in str(e.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda a, o: boft.merge(a, a, o, colour=True),
        lambda a, o: boft.merge(a, a, o, help=True),
        lambda a, o: boft.verify(a, json=True),
        lambda a, o: boft.convert(a, o, output_format="peft"),
        lambda a, o: boft.merge(a, a, o, force="yes"),
    ],
)
def test_unknown_options_are_type_errors(llama, tmp_path, call):
    _, adapter, _ = llama
    with pytest.raises(TypeError):
        call(adapter, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_version_matches_the_commands():
    o = subprocess.run([BIN / "boft-merge", "--version"], capture_output=True, text=True)
    assert o.returncode == 0
    assert o.stdout.strip() == f"boft-merge {boft.__version__}"


def _bytes_of(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_several_adapters_switching_batches_and_composition(tmp_path):
    """The issue-13 flags through the module: a list of adapters, unmerge_adapter, batch, compose."""
    base = PEFT / "bases/llama_f32"
    a, b = PEFT / "adapters/llama_f32_f2", PEFT / "adapters/llama_f32_f3"
    stats = boft.merge(base, [a, b], tmp_path / "ab", quiet=True)
    assert stats["transformed"] > 0 and len(stats["outputs"]) == 1
    # The same as the command line with two --adapter flags, byte for byte.
    subprocess.run(
        [BIN / "boft-merge", "--base", base, "--adapter", a, "--adapter", b,
         "-o", tmp_path / "cli", "-q"], check=True)
    assert _bytes_of(tmp_path / "ab") == _bytes_of(tmp_path / "cli")
    # Switch: A merged, then taken out and B put in.
    boft.merge(base, a, tmp_path / "a", quiet=True)
    boft.merge(tmp_path / "a", b, tmp_path / "switched", unmerge_adapter=a,
               keep_replaced=True, quiet=True)
    # A batch of two jobs: each output as its single merge.
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({"jobs": [
        {"output": str(tmp_path / "j1"), "adapters": [str(a)]},
        {"output": str(tmp_path / "j2"), "adapters": [str(a), str(b)]},
    ]}))
    done = boft.merge(base, batch=jobs, quiet=True)
    assert [o["path"] for o in done["outputs"]] == [str(tmp_path / "j1"), str(tmp_path / "j2")]
    assert _bytes_of(tmp_path / "j1") == _bytes_of(tmp_path / "a")
    assert _bytes_of(tmp_path / "j2") == _bytes_of(tmp_path / "ab")
    # Composition: one adapter for the two.
    done = boft.convert(None, tmp_path / "c.safetensors", compose=[a, b])
    assert done["source_format"] == "composed(peft-boft, peft-boft)"
    boft.merge(base, tmp_path / "c.safetensors", tmp_path / "c", quiet=True)
    report = boft.verify(tmp_path / "c.safetensors", base=base, merged=tmp_path / "ab")
    assert report["passed"] is True, report["failed"]
