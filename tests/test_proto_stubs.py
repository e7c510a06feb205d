"""The committed gRPC stubs against the .proto, by meaning rather than bytes, and the versions
they need against what pyproject.toml promises.

A byte comparison with a fresh protoc run fails whenever grpcio-tools moves a patch version (its
version is stamped into the files); these checks fail only on a real drift: a message, field,
option or method the .proto has and the stubs do not (or the reverse)."""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from astrai_serve.proto import generate_pb2, generate_pb2_grpc
from astrai_serve.proto import regenerate

ROOT = Path(__file__).resolve().parents[1]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def _floor(requirement_name: str) -> tuple[int, ...]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(rf"{re.escape(requirement_name)}\s*[><=]", d)]
    return _version(re.search(r">=\s*([0-9.]+)", spec).group(1))


def _committed_descriptor() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(generate_pb2.DESCRIPTOR.serialized_pb)


def test_committed_stubs_embed_the_proto_as_it_is():
    compiled = regenerate.compiled_descriptor()
    committed = _committed_descriptor()
    assert committed == compiled, ("astrai_serve/proto/generate_pb2.py drifted from protos/astrai/v1/generate.proto: "
                                   "run `make proto`")


def test_the_descriptor_check_sees_a_real_drift(tmp_path):
    # The same .proto with one more field must not compare equal: the check above can fail.
    source = (regenerate.PROTO_ROOT / regenerate.PROTO_FILE).read_text()
    changed = source.replace("message Usage {", "message Usage {\n  int32 extra_field_for_the_test = 99;", 1)
    assert changed != source
    target = tmp_path / regenerate.PROTO_FILE
    target.parent.mkdir(parents=True)
    target.write_text(changed)
    assert regenerate.compiled_descriptor(tmp_path) != _committed_descriptor()


class _RecordingChannel:
    """What a generated Stub asks of its channel: one multicallable per method, by kind and path."""

    def __init__(self) -> None:
        self.methods: dict[str, str] = {}

    def _record(kind):
        def make(self, path, *args, **kwargs):
            self.methods[path] = kind
            return object()
        return make

    unary_unary = _record("unary_unary")
    unary_stream = _record("unary_stream")
    stream_unary = _record("stream_unary")
    stream_stream = _record("stream_stream")


def test_committed_grpc_stub_has_every_method_of_the_proto():
    descriptor = regenerate.compiled_descriptor()
    expected = {}
    for service in descriptor.service:
        for m in service.method:
            kind = f"{'stream' if m.client_streaming else 'unary'}_{'stream' if m.server_streaming else 'unary'}"
            expected[f"/{descriptor.package}.{service.name}/{m.name}"] = kind
    channel = _RecordingChannel()
    for service in descriptor.service:
        getattr(generate_pb2_grpc, f"{service.name}Stub")(channel)
        servicer = getattr(generate_pb2_grpc, f"{service.name}Servicer")
        assert {m.name for m in service.method} <= set(vars(servicer)), f"{service.name}Servicer lacks methods"
    assert channel.methods == expected


def test_committed_type_stubs_name_every_message_and_field():
    tree = ast.parse((regenerate.STUB_DIR / "generate_pb2.pyi").read_text())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for message in regenerate.compiled_descriptor().message_type:
        assert message.name in classes, f"generate_pb2.pyi lacks {message.name}"
        annotated = {n.target.id for n in classes[message.name].body
                     if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        missing = {f.name for f in message.field} - annotated
        assert not missing, f"generate_pb2.pyi's {message.name} lacks {sorted(missing)}"


def test_pyproject_floors_admit_only_runtimes_the_stubs_import_on():
    grpc_generated = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'",
                               (regenerate.STUB_DIR / "generate_pb2_grpc.py").read_text()).group(1)
    gencode = re.search(r"Protobuf Python Version: ([0-9.]+)",
                        (regenerate.STUB_DIR / "generate_pb2.py").read_text()).group(1)
    for name in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        assert _floor(name) >= _version(grpc_generated), f"{name}'s floor is below the stubs' grpcio {grpc_generated}"
    assert _floor("protobuf") >= _version(gencode), f"protobuf's floor is below the stubs' gencode {gencode}"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (protobuf,) = [d for d in deps if d.startswith("protobuf")]
    assert f"<{_version(gencode)[0] + 1}" in protobuf.replace(" ", ""), "protobuf must stay in the gencode's major"
    # `make proto` reproduces the committed bytes with the pinned generator.
    pinned = re.search(r"^grpcio-tools==([0-9.]+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert pinned == grpc_generated, f"constraints.txt pins grpcio-tools {pinned}, the stubs were made by {grpc_generated}"


def test_regenerating_with_the_pinned_generator_gives_the_committed_bytes(tmp_path):
    from importlib.metadata import version

    committed_by = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'",
                             (regenerate.STUB_DIR / "generate_pb2_grpc.py").read_text()).group(1)
    if version("grpcio-tools") != committed_by:
        pytest.skip(f"grpcio-tools {version('grpcio-tools')} is not the pinned {committed_by} (make setup pins it)")
    for path in regenerate.generate(tmp_path):
        assert (regenerate.STUB_DIR / path.name).read_text() == path.read_text(), f"{path.name}: run `make proto`"
