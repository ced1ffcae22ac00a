"""The console scripts pip installs: the Rust binaries' contract (help, exit codes 0/1/2, one
stderr line per error) and their results on the fixtures."""

import json
import re
import subprocess
import sys

import pytest

from conftest import BIN, PEFT, assert_merge_matches

COMMANDS = ["boft-merge", "boft-convert", "boft-verify", "boft-extract"]


def run(*argv):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True)


@pytest.mark.parametrize("command", COMMANDS)
def test_on_path_with_help(command):
    assert (BIN / command).exists()
    o = run(BIN / command, "--help")
    assert o.returncode == 0, o.stderr
    assert f"Usage: {command} " in o.stdout
    assert "Example" in o.stdout
    assert "Exit status" in o.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_usage_error_is_one_line_exit_2(command):
    o = run(BIN / command, "--no-such-flag")
    assert o.returncode == 2
    assert o.stdout == ""
    assert o.stderr.count("\n") == 1
    assert o.stderr.startswith(f"{command}: error[usage] ")
    assert o.stderr.rstrip().endswith(f"(see {command} --help)")


def test_merge_then_verify(llama, tmp_path):
    base, adapter, expected = llama
    out = tmp_path / "merged"
    o = run(BIN / "boft-merge", "--base", base, "--adapter", adapter, "-o", out)
    assert o.returncode == 0, o.stderr
    # Not a terminal: no progress bar, only the summary line.
    assert o.stderr.count("\n") == 1
    assert o.stderr.startswith(f"merged {out}: ")
    assert o.stderr.rstrip().endswith(" on cpu")
    assert_merge_matches(out, expected, base)
    o = run(BIN / "boft-verify", adapter, "--base", base, "--merged", out, "--json")
    assert o.returncode == 0, o.stdout + o.stderr
    assert json.loads(o.stdout)["passed"] is True
    # The table, whose last line has no newline of its own to flush it.
    o = run(BIN / "boft-verify", adapter, "--base", base, "--merged", out)
    assert o.returncode == 0
    assert "merged-values" in o.stdout


def test_verify_failure_exits_1(llama):
    base, adapter, _ = llama
    o = run(BIN / "boft-verify", adapter, "--base", base, "--merged", PEFT / "merged/llama_f32_f1")
    assert o.returncode == 1, o.stderr
    assert "merged-values" in o.stdout


def test_convert_and_refusals(llama, tmp_path):
    _, adapter, _ = llama
    out = tmp_path / "a.safetensors"
    o = run(BIN / "boft-convert", adapter, "-o", out)
    assert o.returncode == 0, o.stderr
    assert o.stdout.startswith(f"wrote {out}: ")
    before = out.read_bytes()
    o = run(BIN / "boft-convert", adapter, "-o", out)
    assert o.returncode == 2
    assert o.stderr.startswith("boft-convert: error[output-exists] ")
    assert o.stderr.count("\n") == 1
    assert out.read_bytes() == before
    o = run(BIN / "boft-convert", tmp_path / "missing", "-o", tmp_path / "b.safetensors")
    assert o.returncode == 2
    assert o.stderr.startswith("boft-convert: error[not-found] ")
    assert not (tmp_path / "b.safetensors").exists()


def test_install_completions(tmp_path):
    o = run(sys.executable, "-m", "boft", "install-completions", "--prefix", tmp_path)
    assert o.returncode == 0, o.stderr
    listed = o.stdout.split()
    assert len(listed) == 4 * len(COMMANDS)
    for command in COMMANDS:
        man = (tmp_path / "share/man/man1" / f"{command}.1").read_text()
        assert f".TH {command}" in man
        bash = (tmp_path / "share/bash-completion/completions" / command).read_text()
        zsh = (tmp_path / "share/zsh/site-functions" / f"_{command}").read_text()
        fish = (tmp_path / "share/fish/vendor_completions.d" / f"{command}.fish").read_text()
        # Every option the command's --help lists (its option lines, not flags named in prose)
        # appears in each file.
        help_text = run(BIN / command, "--help").stdout
        flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z-]*[a-z])", help_text, re.M))
        flags -= {"--help", "--version"}
        # A flag each command really has (boft-extract reads checkpoints, not adapters).
        assert ("--tuned" if command == "boft-extract" else "--from") in flags
        for flag in flags:
            assert flag in man.replace("\\-", "-"), (command, flag)
            assert flag in bash and flag in zsh, (command, flag)
            assert f"-l {flag[2:]}" in fish, (command, flag)


def test_extract_from_a_peft_merge(tmp_path):
    # One factor with a scale, from a PEFT BOFT merge: the whole change is captured.
    fx = PEFT.parent
    base = fx / "peft_boft" / "bases" / "llama_f32"
    tuned = fx / "peft_boft" / "merged" / "llama_f32_f1"
    out = tmp_path / "a.safetensors"
    o = run(BIN / "boft-extract", "--base", base, "--tuned", tuned, "-o", out, "--side", "input",
            "--block-size", "8", "--row-scale", "--json")
    assert o.returncode == 0, o.stderr
    report = json.loads(o.stdout)
    assert report["total"]["tensors"] == 14
    assert report["total"]["captured"] > 0.999999
    assert out.exists()
