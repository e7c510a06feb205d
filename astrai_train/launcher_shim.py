"""`lightning run model ...` for Lightning >= 2.5.1, which dropped that spelling for `fabric run`.

`python -m astrai_train.launcher_shim install` (run by `make setup`) writes a `lightning` script
next to the interpreter only when no `lightning` command is installed already, so a command that
another package provides is never replaced. The script delegates to Lightning's own launcher.
"""
from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

MARKER = "# astrai lightning-run shim"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["run", "model"]:
        from lightning.fabric.cli import _main as fabric_main  # click group: `fabric run ...`

        sys.argv = ["fabric", "run", *argv[2:]]
        return fabric_main()
    if argv[:1] in (["--help"], ["-h"], []):
        print("usage: lightning run model [FABRIC RUN OPTIONS] SCRIPT [SCRIPT ARGS]\n"
              "A thin delegate to `fabric run` (Lightning's launcher), kept for scripts that use\n"
              "the pre-2.5.1 spelling. Run `fabric run --help` for the options.")
        return 0
    print(f"lightning: unsupported command {' '.join(argv)!r}; only `lightning run model ...` is provided "
          "by astrai's shim (see `fabric run --help`).", file=sys.stderr)
    return 2


def install(bin_dir: Path | None = None) -> Path | None:
    bin_dir = bin_dir or Path(sys.executable).parent
    target = bin_dir / "lightning"
    existing = shutil.which("lightning", path=str(bin_dir)) or (target if target.exists() else None)
    if existing and MARKER not in Path(existing).read_text(errors="ignore"):
        print(f"lightning command already provided at {existing}; leaving it alone")
        return None
    target.write_text(f"#!{sys.executable}\n{MARKER}\nimport sys\n"
                      "from astrai_train.launcher_shim import main\nsys.exit(main())\n")
    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    print(f"installed `lightning run model` shim at {target}")
    return target


if __name__ == "__main__":
    if sys.argv[1:2] == ["install"]:
        install()
    else:
        sys.exit(main())
