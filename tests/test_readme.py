"""The README's examples run, so they cannot rot: its Python blocks against a real `astrai serve`,
and every command of its CLI table parses `--help`."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from daemon_support import ROOT, Process

README = (ROOT / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("readme") / "serve.log"
    proc = Process(["serve", "--model", str(tiny_model_dir), "--served-model-name", "model",
                    "--grpc-port", "0", "--http-port", "0", "--log-level", "warning"], log)
    yield proc
    assert proc.terminate() == 0


def test_readme_has_the_two_commands_first():
    first_screen = README[:1500]
    assert "make demo" in first_screen and "make test" in first_screen


def test_readme_python_examples_run(daemon, tiny_model_dir):
    blocks = python_blocks()
    assert len(blocks) >= 3, "README lost its Python examples"
    http = daemon.ready["http"].removeprefix("http://")
    for block in blocks:
        code = (block.replace("runs/demo/grpo-demo/model", str(tiny_model_dir))
                .replace("127.0.0.1:8000", http).replace("127.0.0.1:50051", daemon.ready["grpc"]))
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"README example failed:\n{block}\n--- stderr ---\n{r.stderr[-3000:]}"
        # A random tiny model may well generate only whitespace; what it printed is the proof.
        assert len(r.stdout) > 1, f"README example printed nothing:\n{block}"


def test_readme_cli_table_commands_exist():
    from astrai_train.cli import COMMANDS, build_parser

    named = set(re.findall(r"^\| `astrai ([a-z-]+)", README, flags=re.M))
    assert named == set(COMMANDS), f"README table {sorted(named)} vs CLI {sorted(COMMANDS)}"
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            build_parser(name).parse_args([name, "--help"])
        assert e.value.code == 0
