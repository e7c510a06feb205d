"""The reference docs stay true to the code.

- docs/configuration.md is regenerated (`python -m astrai_train.docgen`) and must match;
- docs/grpc.md's Python example runs, as written, against a real `astrai serve --no-http`, and its
  grpcurl request bodies are valid requests the daemon answers;
- every metric, rpc, proto field and flag the docs should name is named, and every one they name
  exists; relative links and their anchors resolve.

docgen runs in a subprocess started with the module, so it overlaps the daemon's startup.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from daemon_support import start_serve, wait_for

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OWN_DOCS = ("configuration.md", "grpc.md", "operations.md")

pytestmark = pytest.mark.timeout(120)


def _read(name: str) -> str:
    return (DOCS / name).read_text()


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


@pytest.fixture(scope="module", autouse=True)
def docgen():
    proc = subprocess.Popen([sys.executable, "-m", "astrai_train.docgen", "--stdout"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def rendered(docgen) -> str:
    out, err = docgen.communicate(timeout=90)
    assert docgen.returncode == 0, f"python -m astrai_train.docgen failed:\n{err[-3000:]}"
    return out


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, tmp_path_factory):
    proc = start_serve(tiny_model_dir, tmp_path_factory.mktemp("docs_logs") / "serve.log", "--no-http",
                       "--served-model-name", "tiny")
    yield proc
    proc.kill()


# ---- static checks (no daemon) ------------------------------------------------------------------

def test_operations_md_names_every_metric_and_only_real_ones():
    from astrai_serve.core.metrics import ServerMetrics
    from astrai_serve.facade.prometheus import render_prometheus
    from astrai_serve.proto import generate_pb2 as pb

    stats = pb.GetStatsResponse(histograms=ServerMetrics().histograms(), requests_finished_total={"stop": 1})
    exposed = set(re.findall(r"^# TYPE (\S+) ", render_prometheus(stats, "m"), re.M))
    named = set(re.findall(r"`(astrai_[a-z0-9_]+)(?:\{[^`]*\})?`", _read("operations.md")))
    assert exposed - named == set(), f"docs/operations.md does not describe the metrics {sorted(exposed - named)}"
    assert named - exposed == set(), \
        f"docs/operations.md names metrics that /metrics does not expose: {sorted(named - exposed)}"


def test_grpc_md_names_every_rpc_message_and_field():
    from astrai_serve.proto import generate_pb2 as pb

    text = _read("grpc.md")
    missing = [m.name for m in pb.DESCRIPTOR.services_by_name["GenerationService"].methods
               if f"`{m.name}`" not in text]
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        missing += [message.name] if f"`{message.name}`" not in text else []
        missing += [f"{message.name}.{f.name}" for f in message.fields if f"`{f.name}`" not in text]
    assert not missing, f"docs/grpc.md does not describe {missing} (from protos/astrai/v1/generate.proto)"


def test_flags_named_in_the_serving_docs_exist():
    from astrai_train.cli import build_parser

    known = set()
    for command in ("serve", "gateway"):
        sub = next(a for a in build_parser(command)._actions if hasattr(a, "choices") and a.choices)
        known |= {s for a in sub.choices[command]._actions for s in a.option_strings}
    for name in ("grpc.md", "operations.md"):
        prose = re.sub(r"^```.*?^```", "", _read(name), flags=re.S | re.M)  # code blocks hold other tools' flags
        named = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", prose))
        assert named - known == set(), \
            f"docs/{name} names flags that `astrai serve` / `astrai gateway` lack: {sorted(named - known)}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M), re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


def test_relative_links_and_anchors_resolve():
    broken = []
    for name in OWN_DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", _read(name)):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (DOCS / path).resolve() if path else DOCS / name
            if not file.exists():
                broken.append(f"{name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
                broken.append(f"{name}: {target} (no such heading)")
    assert not broken, "broken links in docs/: " + "; ".join(broken)


# ---- against a real daemon ----------------------------------------------------------------------

def test_grpc_python_example_runs_against_a_real_daemon(daemon, tmp_path):
    blocks = _blocks(_read("grpc.md"), "python")
    assert len(blocks) == 1, f"docs/grpc.md should hold exactly one ```python example, found {len(blocks)}"
    script = tmp_path / "grpc_example.py"
    script.write_text(blocks[0])
    env = {k: v for k, v in os.environ.items() if k != "ASTRAI_API_KEY"}
    env["ASTRAI_GRPC_TARGET"] = daemon.ready["grpc"]
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"the docs/grpc.md example failed:\n{result.stderr[-3000:]}"
    out = result.stdout
    assert "model=tiny context_length=512" in out, out
    assert re.search(r"^finish_reason=(stop|length)$", out, re.M), out
    usage = re.search(r"^usage prompt=(\d+) completion=(\d+) cached=(\d+)$", out, re.M)
    assert usage and int(usage[1]) > 0 and 1 <= int(usage[2]) <= 24, out
    assert "cancelled: CANCELLED" in out, out
    assert "error: INVALID_ARGUMENT param=temperature: " in out, out

    # What the example says about cancellation holds: the pages are freed, the cancel is counted.
    from astrai_serve.proto import generate_pb2 as pb
    from astrai_serve.proto import generate_pb2_grpc as pb_grpc

    with grpc.insecure_channel(daemon.ready["grpc"]) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        stats = wait_for(lambda: (s := stub.GetStats(pb.GetStatsRequest())).kv_pages_in_use == 0 and s, timeout=10)
        assert stats, "the cancelled request's pages were not freed"
        assert stats.requests_finished_total["cancelled"] >= 1 and stats.requests_finished_total["rejected"] >= 1


def _grpcurl_commands(text: str) -> list[str]:
    commands = []
    for block in _blocks(text, "sh"):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip().startswith("grpcurl")]
    return commands


def test_grpcurl_examples_are_valid_requests_the_daemon_answers(daemon):
    from astrai_serve.proto import generate_pb2 as pb
    from astrai_serve.proto import generate_pb2_grpc as pb_grpc

    service = pb.DESCRIPTOR.services_by_name["GenerationService"]
    commands = _grpcurl_commands(_read("grpc.md"))
    calls = [c for c in commands if " -d " in c and "astrai.v1.GenerationService/" in c]
    assert len(calls) >= 3, f"expected grpcurl calls with -d in docs/grpc.md, found {commands}"
    for symbol in re.findall(r" describe (\S+)", " ".join(commands)):
        name = symbol.removeprefix("astrai.v1.")
        assert name in service.full_name or name in pb.DESCRIPTOR.message_types_by_name, f"no such symbol: {symbol}"
    with grpc.insecure_channel(daemon.ready["grpc"]) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for command in calls:
            body = re.search(r" -d '([^']*)'", command)[1]
            method = service.methods_by_name[re.search(r"astrai\.v1\.GenerationService/(\w+)", command)[1]]
            request = getattr(pb, method.input_type.name)()
            json_format.Parse(body, request)  # raises on a field the contract does not have
            reply = getattr(stub, method.name)(request, timeout=60)
            if method.name == "Generate":
                replies = list(reply)
                assert replies[-1].finish_reason in ("stop", "length") and replies[-1].HasField("usage"), command
                assert json.loads(body)["params"]["max_tokens"] >= replies[-1].usage.completion_tokens


# ---- the generated reference (last: it waits for the docgen subprocess) ---------------------------

def test_every_config_field_has_its_comment(rendered):
    from astrai_train.docgen import MISSING_COMMENT

    rows = [line for line in rendered.splitlines() if MISSING_COMMENT in line]
    assert not rows, "config fields without the one-line comment the docs are generated from:\n" + "\n".join(rows)


def test_configuration_md_is_up_to_date(rendered):
    import difflib

    current = _read("configuration.md")
    if current != rendered:
        diff = "".join(list(difflib.unified_diff(current.splitlines(True), rendered.splitlines(True),
                                                 "docs/configuration.md", "generated"))[:60])
        pytest.fail(f"docs/configuration.md is out of date: run `python -m astrai_train.docgen`\n{diff}")


def test_docgen_output_does_not_depend_on_the_checkout(rendered):
    assert str(ROOT) not in rendered, "an absolute path of this checkout leaked into docs/configuration.md"
