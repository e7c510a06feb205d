"""`astrai tokenizer train` as a user runs it: a real subprocess on real files."""
from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pytest

from astrai_train.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "shakespeare"
CHINESE = "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。\n床前明月光，疑是地上霜。举头望明月，低头思故乡。\n"


def astrai(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "astrai_train.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small gz slice of one play plus a plain file of Chinese poems."""
    d = tmp_path_factory.mktemp("inputs")
    with gzip.open(SHAKESPEARE / "tempest_gut.txt.gz", "rt", encoding="utf-8") as f:
        english = f.read()[:60_000]
    slice_gz = d / "tempest_slice.txt.gz"
    with gzip.open(slice_gz, "wt", encoding="utf-8") as f:
        f.write(english)
    chinese = d / "poems.txt"
    chinese.write_text(CHINESE * 20, encoding="utf-8")
    return [slice_gz, chinese]


def test_train_writes_a_loadable_tokenizer(inputs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "tok"
    result = astrai("tokenizer", "train", "--input", *map(str, inputs), "--vocab-size", "500", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}/tokenizer.json" in result.stdout and f"wrote {out}/tokenizer_config.json" in result.stdout
    assert "vocab_size 500" in result.stdout
    tok = Tokenizer.from_pretrained(out)
    assert tok.vocab_size == 500 and tok.eos_id == 0 and tok.hash[:16] in result.stdout
    for text in ("Full fathom five thy father lies", CHINESE, "🌊 sea-change"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("明月")) < 6  # the poems taught it Chinese merges


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vocab-size", "100"], "vocab_size 100 is too small: byte-level BPE needs at least 261"),
        (["--vocab-size", "300", "--input", "no/such/file.txt"], "tokenizer training input not found: no/such/file.txt"),
    ],
)
def test_bad_arguments_give_one_clear_error(inputs: list[Path], tmp_path: Path, args: list[str], message: str) -> None:
    base = ["tokenizer", "train", "--input", str(inputs[1]), "--out", str(tmp_path / "tok")]
    result = astrai(*base, *args)  # a later --input replaces the earlier one
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "tok").exists()


def test_help_lists_the_options() -> None:
    result = astrai("tokenizer", "train", "--help")
    assert result.returncode == 0
    for flag in ("--input", "--vocab-size", "--out", "--min-frequency"):
        assert flag in result.stdout
