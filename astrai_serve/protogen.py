"""Generate the Python gRPC stubs of protos/astrai/v1/generate.proto into astrai_serve/proto/.

`make proto` runs `python -m astrai_serve.protogen`. protoc names imports after the .proto's
path (`from astrai.v1 import generate_pb2`), which is not a package of ours, so the generated
import lines are rewritten to `from astrai_serve.proto import ...`. The stubs are committed;
tests/test_daemon_proto.py regenerates them into a temporary directory and fails on any drift.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_FILE = "astrai/v1/generate.proto"
STUB_DIR = Path(__file__).resolve().parent / "proto"
STUB_PACKAGE = "astrai_serve.proto"
# The files protoc writes for PROTO_FILE, relative to its output directory.
GENERATED = ("generate_pb2.py", "generate_pb2.pyi", "generate_pb2_grpc.py")


def run_protoc(proto_root: Path, proto_file: str, out_dir: Path) -> None:
    """Run the protoc bundled with grpcio-tools (no system protoc needed)."""
    from grpc_tools import protoc  # imported here: only generation needs grpcio-tools

    if not (proto_root / proto_file).is_file():
        raise FileNotFoundError(f"proto file not found: {proto_root / proto_file}")
    args = [
        "protoc",
        f"-I{proto_root}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        proto_file,
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code} on {proto_root / proto_file}")


def _fix_imports(text: str) -> str:
    # `from astrai.v1 import generate_pb2 as ...` -> `from astrai_serve.proto import generate_pb2 as ...`
    return re.sub(r"^from astrai\.v1 import ", f"from {STUB_PACKAGE} import ", text, flags=re.M)


def generate(out_dir: Path) -> list[Path]:
    """Write the post-processed stubs into out_dir and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_protoc(PROTO_ROOT, PROTO_FILE, Path(tmp))
        produced = Path(tmp) / Path(PROTO_FILE).parent
        written = []
        for name in GENERATED:
            text = (produced / name).read_text()
            target = out_dir / name
            target.write_text(_fix_imports(text))
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="regenerate the gRPC stubs from protos/")
    parser.add_argument("--out", type=Path, default=STUB_DIR, help=f"output directory (default {STUB_DIR})")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
