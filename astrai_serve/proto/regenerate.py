"""Generate the Python gRPC stubs of protos/astrai/v1/generate.proto into astrai_serve/proto/.

`make proto` runs `python -m astrai_serve.proto.regenerate` with the grpcio-tools that
constraints.txt pins (the version the committed stubs name in GRPC_GENERATED_VERSION, so a
regeneration is byte for byte what is committed). protoc names imports after the .proto's path
(`from astrai.v1 import generate_pb2`), which is not a package of ours, so the generated import
lines are rewritten to `from astrai_serve.proto import ...`. tests/test_proto_stubs.py checks the
committed stubs against the .proto by meaning (descriptor, service methods, typed fields), so a
real drift fails on any grpcio-tools while a different generator version does not.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_FILE = "astrai/v1/generate.proto"
STUB_DIR = Path(__file__).resolve().parent
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


def compiled_descriptor(proto_root: Path = PROTO_ROOT, proto_file: str = PROTO_FILE):
    """The FileDescriptorProto protoc makes of the .proto now: what the stubs must embed."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        code = protoc.main(["protoc", f"-I{proto_root}", f"--descriptor_set_out={out}", proto_file])
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code} on {proto_root / proto_file}")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    (descriptor,) = [f for f in files if f.name == proto_file]
    # protoc's descriptor sets spell out each field's json_name; the one the Python generator
    # embeds leaves it out where it is the default (the name in lowerCamelCase).
    messages = list(descriptor.message_type)
    while messages:
        message = messages.pop()
        for field in message.field:
            if field.json_name == _default_json_name(field.name):
                field.ClearField("json_name")
        messages.extend(message.nested_type)
    return descriptor


def _default_json_name(name: str) -> str:
    return re.sub(r"_+([a-zA-Z0-9])?", lambda m: (m.group(1) or "").upper(), name)


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
