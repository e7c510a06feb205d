"""The gRPC core as an outside client sees it: stubs compiled from the .proto alone, a real
`astrai serve --no-http` process, health, reflection, cancellation, bad input, a gateway in
front of it, and SIGTERM (the module's last test)."""
from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from daemon_support import Process, proto_stubs, start_serve, wait_for


pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    return proto_stubs(tmp_path_factory.mktemp("grpc_stubs"))


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, tmp_path_factory):
    proc = start_serve(tiny_model_dir, tmp_path_factory.mktemp("logs") / "serve.log", "--no-http",
                       "--served-model-name", "tiny", "--shutdown-timeout", "20")
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def channel(daemon):
    with grpc.insecure_channel(daemon.ready["grpc"]) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(stubs, channel):
    return stubs[1].GenerationServiceStub(channel)


def _collect(responses):
    texts, ids, finish, usage = {}, {}, {}, None
    for r in responses:
        texts[r.index] = texts.get(r.index, "") + r.text
        ids.setdefault(r.index, []).extend(r.token_ids)
        if r.finish_reason:
            finish[r.index] = r.finish_reason
        if r.HasField("usage"):
            assert usage is None, "usage must come once, on the last message"
            usage = r.usage
    return texts, ids, finish, usage


def test_generate_streams_text_ids_finish_and_usage(stubs, stub):
    pb2 = stubs[0]
    request = pb2.GenerateRequest(request_id="g-1", text="To be, or not to be",
                                  params=pb2.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    responses = list(stub.Generate(request, timeout=60))
    assert len(responses) >= 2, "tokens must stream, not arrive in one message"
    assert all(r.request_id == "g-1" for r in responses)
    texts, ids, finish, usage = _collect(responses)
    assert finish == {0: "length"} and responses[-1].finish_reason == "length"
    assert len(ids[0]) == 12 and usage.completion_tokens == 12
    assert usage.prompt_tokens == stub.Tokenize(pb2.TokenizeRequest(text="To be, or not to be")).count
    # Greedy is deterministic, and the deltas add up to the decoded text.
    again = _collect(stub.Generate(request, timeout=60))
    assert again[1] == ids and again[0] == texts


def test_generate_chat_n2_seed_and_stop(stubs, stub):
    pb2 = stubs[0]
    messages = pb2.ChatMessages(messages=[pb2.ChatMessage(role="user", content="Speak, Horatio.")])
    params = pb2.SamplingParams(max_tokens=10, temperature=1.0, seed=7, n=2, ignore_eos=True)
    texts, ids, finish, usage = _collect(stub.Generate(pb2.GenerateRequest(messages=messages, params=params), timeout=60))
    assert set(finish) == {0, 1} and usage.completion_tokens == len(ids[0]) + len(ids[1]) == 20
    same = _collect(stub.Generate(pb2.GenerateRequest(messages=messages, params=params), timeout=60))
    assert same[1] == ids, "the same seed must give the same samples"
    # A stop string taken from the greedy text ends the sample with "stop" and is cut from it.
    greedy = pb2.SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    full = _collect(stub.Generate(pb2.GenerateRequest(text="Horatio", params=greedy), timeout=60))[0][0]
    stop = full.strip()[2:6] if len(full.strip()) > 6 else full.strip()[:2]
    params = pb2.SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop])
    texts, _, finish, _ = _collect(stub.Generate(pb2.GenerateRequest(text="Horatio", params=params), timeout=60))
    assert finish[0] == "stop" and stop not in texts[0] and full.startswith(texts[0])


def test_generate_token_ids_and_logprobs(stubs, stub):
    pb2 = stubs[0]
    params = pb2.SamplingParams(max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=3, ignore_eos=True)
    responses = list(stub.Generate(pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=[5, 6, 7, 8]), params=params), timeout=60))
    lps = [lp for r in responses for lp in r.logprobs]
    assert len(lps) == 4
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        # greedy: the sampled token is the most likely one
        assert lp.token_id == lp.top_logprobs[0].token_id and lp.logprob == pytest.approx(lp.top_logprobs[0].logprob, abs=1e-4)


def test_generate_prompt_logprobs_echo_and_max_tokens_zero(stubs, stub, tiny_model_dir):
    from astrai_train.tokenizer import Tokenizer

    pb2 = stubs[0]
    ids = [5, 6, 7, 8, 9, 10]
    scored = pb2.SamplingParams(max_tokens=0, prompt_logprobs=2)
    responses = list(stub.Generate(pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=ids), params=scored,
                                                       echo_prompt=True), timeout=60))
    assert len(responses) == 1   # max_tokens=0: one message, the prompt scored, nothing generated
    (r,) = responses
    assert r.finish_reason == "length" and list(r.token_ids) == [] and r.text == ""
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 0
    assert r.prompt_text == Tokenizer.from_pretrained(tiny_model_dir).decode(ids, skip_special_tokens=False)
    lps = list(r.prompt_logprobs)
    assert [lp.token_id for lp in lps] == ids and all(lp.token for lp in lps)
    assert not lps[0].HasField("logprob") and not lps[0].top_logprobs   # nothing precedes the first token
    for lp in lps[1:]:
        assert lp.HasField("logprob") and lp.logprob <= 0 and len(lp.top_logprobs) == 2
        assert lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob and lp.logprob <= lp.top_logprobs[0].logprob
    # Generating as well: the prompt's log-probs come once per sample, in its first message.
    both = pb2.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=2, n=2)
    responses = list(stub.Generate(pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=ids), params=both), timeout=60))
    for index in (0, 1):
        mine = [m for m in responses if m.index == index]
        assert [len(m.prompt_logprobs) for m in mine][0] == 6 and all(not m.prompt_logprobs for m in mine[1:])
        assert [lp.logprob for lp in mine[0].prompt_logprobs] == [lp.logprob for lp in r.prompt_logprobs]
        assert all(not m.prompt_text for m in mine)   # not asked: no echo
    assert _collect(responses)[3].completion_tokens == 6


def test_tokenize_and_model_info(stubs, stub, tiny_model_dir):
    pb2 = stubs[0]
    info = stub.ModelInfo(pb2.ModelInfoRequest())
    assert info.name == "tiny" and info.context_length == 512 and info.vocab_size > 0 and info.eos_id in info.stop_token_ids
    from astrai_train.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_model_dir)
    reply = stub.Tokenize(pb2.TokenizeRequest(text="Good night, sweet prince"))
    assert list(reply.token_ids) == tok.encode("Good night, sweet prince") and reply.max_len == 512
    chat = pb2.ChatMessages(messages=[pb2.ChatMessage(role="user", content="hi")])
    reply = stub.Tokenize(pb2.TokenizeRequest(messages=chat, add_generation_prompt=True))
    assert list(reply.token_ids) == tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    # Generate counts the same prompt tokens; Detokenize gives the text (special tokens kept) back
    usage = _collect(stub.Generate(pb2.GenerateRequest(messages=chat, params=pb2.SamplingParams(max_tokens=1)),
                                   timeout=30))[3]
    assert usage.prompt_tokens == reply.count == len(reply.token_ids)
    text = stub.Detokenize(pb2.DetokenizeRequest(token_ids=reply.token_ids)).text
    assert text == tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=False)
    ids = stub.Tokenize(pb2.TokenizeRequest(text="Good night", add_special_tokens=False)).token_ids
    assert stub.Detokenize(pb2.DetokenizeRequest(token_ids=ids)).text == "Good night"
    for bad in ([5, info.vocab_size], [-1]):
        with pytest.raises(grpc.RpcError) as err:
            stub.Detokenize(pb2.DetokenizeRequest(token_ids=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and str(bad[-1]) in err.value.details()
        assert ("astrai-error-param", "token_ids") in err.value.trailing_metadata()


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "astrai.v1.GenerationService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="astrai.v1.GenerationService")]
    replies = list(refl.ServerReflectionInfo(iter(requests)))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"astrai.v1.GenerationService", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FileDescriptorProto.FromString(replies[1].file_descriptor_response.file_descriptor_proto[0])
    assert fd.package == "astrai.v1"
    assert [m.name for m in fd.service[0].method] == ["Generate", "Tokenize", "Detokenize", "ModelInfo", "GetStats"]
    # Reflection v1 (what grpcurl asks first): the same messages on the wire under v1's path.
    v1 = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                               request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                               response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    v1_replies = list(v1(iter(requests)))
    assert {s.name for s in v1_replies[0].list_services_response.service} == names
    assert v1_replies[1].file_descriptor_response == replies[1].file_descriptor_response


BAD = [  # (description, request kwargs, words the message must contain)
    ("no input", dict(), "input"),
    ("empty text", dict(text=""), "empty"),
    ("token id outside the vocabulary", dict(token_ids={"ids": [1, 10**6]}), "1000000"),
    ("negative max_tokens", dict(text="hi", params={"max_tokens": -1}), "max_tokens"),
    ("max_tokens beyond the context", dict(text="hi", params={"max_tokens": 100000}), "context length"),
    ("negative temperature", dict(text="hi", params={"temperature": -1.0}), "temperature"),
    ("top_p zero", dict(text="hi", params={"top_p": 0.0}), "top_p"),
    ("n zero", dict(text="hi", params={"n": 0}), "n="),
    ("unknown role", dict(messages={"messages": [{"role": "wizard", "content": "x"}]}), "wizard"),
    ("prompt longer than the context", dict(text="word " * 3000), "context length"),
    ("logit_bias id outside the vocabulary", dict(text="hi", params={"logit_bias": {10**6: 1.0}}),
     "logit_bias has token id 1000000"),
    ("logit_bias negative id", dict(text="hi", params={"logit_bias": {-3: 1.0}}), "logit_bias={-3: 1.0}"),
    ("logit_bias too large", dict(text="hi", params={"logit_bias": {5: 101.0}}), "logit_bias={5: 101.0}"),
    ("prompt_logprobs negative", dict(text="hi", params={"prompt_logprobs": -1}), "prompt_logprobs=-1"),
    ("prompt_logprobs too many", dict(text="hi", params={"prompt_logprobs": 21}), "prompt_logprobs=21"),
    ("min_tokens negative", dict(text="hi", params={"min_tokens": -2}), "min_tokens=-2"),
    ("min_tokens above max_tokens", dict(text="hi", params={"max_tokens": 3, "min_tokens": 4}), "min_tokens=4"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_requests_are_invalid_argument(stubs, stub, case):
    pb2 = stubs[0]
    _, kwargs, words = case
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb2.GenerateRequest(**kwargs), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.details(), info.value.details()
    for name in ("logit_bias", "prompt_logprobs", "min_tokens"):
        if name in words:
            assert ("astrai-error-param", name) in info.value.trailing_metadata()


def test_generate_logit_bias(stubs, stub):
    pb2 = stubs[0]
    prompt = pb2.TokenIds(ids=[5, 6, 7, 8])

    def ids(params):
        return _collect(stub.Generate(pb2.GenerateRequest(token_ids=prompt, params=params), timeout=60))[1][0]

    forced = pb2.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logit_bias={300: 100.0})
    assert ids(forced) == [300] * 3
    forced.temperature = 1.0                  # sampled rows too
    assert ids(forced) == [300] * 3
    greedy = pb2.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    plain = ids(greedy)
    greedy.logit_bias.update({t: -100.0 for t in plain})   # a ban on every token greedy picked
    banned = ids(greedy)
    assert len(banned) == 3 and not set(banned) & set(plain)
    # min_tokens: the forced token is also a stop token, held back for 4 tokens, then taken
    held = pb2.SamplingParams(max_tokens=9, temperature=0.0, logit_bias={300: 100.0}, stop_token_ids=[300],
                              min_tokens=4)
    assert ids(held)[4:] == [300] and 300 not in ids(held)[:4] and len(ids(held)) == 5


def test_server_survives_bad_requests_and_duplicate_ids(stubs, stub):
    pb2 = stubs[0]
    params = pb2.SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    first = stub.Generate(pb2.GenerateRequest(request_id="dup", text="Once more", params=params), timeout=60)
    head = next(first)  # running now
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb2.GenerateRequest(request_id="dup", text="again", params=params), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dup" in info.value.details()
    _, ids, finish, _ = _collect(first)  # the original is unharmed by the rejected duplicate
    assert finish == {0: "length"} and len(head.token_ids) + len(ids[0]) == 200
    ok = _collect(stub.Generate(pb2.GenerateRequest(text="hi", params=pb2.SamplingParams(max_tokens=2)), timeout=30))
    assert ok[2] == {0: "length"}


def test_cancel_aborts_and_frees_pages(stubs, stub):
    pb2 = stubs[0]
    params = pb2.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    before = stub.GetStats(pb2.GetStatsRequest())
    call = stub.Generate(pb2.GenerateRequest(text="Now is the winter", params=params), timeout=60)
    next(call)
    assert stub.GetStats(pb2.GetStatsRequest()).kv_pages_in_use > 0
    call.cancel()
    stats = wait_for(lambda: (s := stub.GetStats(pb2.GetStatsRequest())).kv_pages_in_use == 0 and s)
    assert stats, "cancelling the stream must free its pages"
    time.sleep(0.2)
    generated = stub.GetStats(pb2.GetStatsRequest()).generation_tokens_total - before.generation_tokens_total
    assert generated < 200, f"the cancelled request went on generating ({generated} tokens) for nobody"
    assert stats.requests_finished_total["cancelled"] >= 1


@pytest.mark.parametrize("argv, words", [
    (["--model", "/no/such/dir"], "--model /no/such/dir: no such model directory"),
    (["--grpc-port", "70000"], "--grpc-port 70000"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout -1"),
    (["--page-size", "0"], "page_size=0"),
    (["--api-server-count", "0"], "--api-server-count 0: must be in [1, 64]"),
    (["--api-server-count", "2", "--http-in-process"],
     "--api-server-count 2: more than one facade process cannot go with --http-in-process"),
])
def test_serve_rejects_bad_arguments_with_one_clear_line(argv, words, tiny_model_dir, capsys):
    from astrai_train.cli import main

    full = ["serve", "--model", str(tiny_model_dir), *argv] if argv[0] != "--model" else ["serve", *argv]
    assert main(full) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("astrai serve: error:") and words in err and "Traceback" not in err


@pytest.mark.parametrize("n, max_tokens", [(1, 300), (2, 120)])
def test_a_lagging_stream_gets_its_backlog_coalesced(stubs, stub, daemon, n, max_tokens):
    """A client that does not read while the engine runs (with the REST facade's small receive
    window, so the core feels it at once) gets fewer messages than tokens, and what they carry,
    concatenated, is exactly the stream a prompt reader gets: ids, text, logprobs, finish, usage."""
    from astrai_serve.facade.core_client import CHANNEL_OPTIONS

    pb2 = stubs[0]
    params = pb2.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=5, n=n, ignore_eos=True, logprobs=True)
    request = pb2.GenerateRequest(text="Lord, what fools", params=params)
    prompt = list(stub.Generate(request, timeout=60))
    before = stub.GetStats(pb2.GetStatsRequest()).generation_tokens_total
    with grpc.insecure_channel(daemon.ready["grpc"], options=CHANNEL_OPTIONS) as channel:
        call = stubs[1].GenerationServiceStub(channel).Generate(request, timeout=60)
        # Read nothing until the engine has generated every token of this request.
        assert wait_for(lambda: stub.GetStats(pb2.GetStatsRequest()).generation_tokens_total - before >= n * max_tokens,
                        timeout=60)
        lagged = list(call)
    assert len(lagged) < len(prompt) / 2, f"{len(lagged)} messages for {n * max_tokens} tokens: nothing coalesced"
    assert max(len(r.token_ids) for r in lagged) > 10
    for responses in (prompt, lagged):
        assert all(len(r.logprobs) == len(r.token_ids) for r in responses)
        assert sum(r.HasField("usage") for r in responses) == 1 and responses[-1].HasField("usage")
    assert _collect(lagged)[:3] == _collect(prompt)[:3]  # text, ids, finish per sample
    assert _collect(lagged)[3] == _collect(prompt)[3]    # usage
    for i in range(n):
        assert [lp.token_id for r in lagged if r.index == i for lp in r.logprobs] == _collect(prompt)[1][i]
        assert ([lp.logprob for r in lagged if r.index == i for lp in r.logprobs]
                == pytest.approx([lp.logprob for r in prompt if r.index == i for lp in r.logprobs], abs=1e-5))


def test_gateway_in_front_of_the_core(daemon, tmp_path):
    import openai

    gateway = Process(["gateway", "--grpc-target", daemon.ready["grpc"], "--http-port", "0", "--log-level", "warning"],
                      tmp_path / "gateway.log")
    try:
        client = openai.OpenAI(base_url=gateway.ready["http"] + "/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model="tiny", prompt="Friends, Romans", max_tokens=3)
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
        assert [m.id for m in client.models.list()] == ["tiny"]
    finally:
        assert gateway.terminate() == 0, gateway.stderr()


def test_sigterm_drains_then_second_signal_aborts_and_exits_zero(stubs, stub, channel, daemon):
    """Last in the module: it stops the module's daemon (started with --shutdown-timeout 20).
    SIGTERM: new work is refused, a short in-flight request finishes; a second SIGTERM aborts
    the long one at once instead of waiting out the timeout; exit code 0."""
    pb2 = stubs[0]
    short = stub.Generate(pb2.GenerateRequest(text="The rest is silence", params=pb2.SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True)), timeout=60)
    long = stub.Generate(pb2.GenerateRequest(text="Words, words", params=pb2.SamplingParams(
        max_tokens=480, temperature=0.0, ignore_eos=True)), timeout=60)
    heads = [next(short), next(long)]  # both admitted and running
    results: dict = {}
    readers = {k: threading.Thread(target=lambda k=k, c=c: results.update({k: _collect(c)}))
               for k, c in (("short", short), ("long", long))}
    for r in readers.values():
        r.start()
    daemon.proc.send_signal(signal.SIGTERM)
    health = health_pb2_grpc.HealthStub(channel)
    assert wait_for(lambda: health.Check(health_pb2.HealthCheckRequest()).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=5, interval=0.01)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb2.GenerateRequest(text="late", params=pb2.SamplingParams(max_tokens=2)), timeout=5))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.details()
    readers["short"].join(30)
    assert results["short"][2] == {0: "length"}, "an admitted request must be allowed to finish"
    assert "long" not in results and daemon.proc.poll() is None, "still draining the long request"
    signalled = time.monotonic()
    code = daemon.terminate(timeout=60)  # the second SIGTERM
    readers["long"].join(30)
    assert code == 0, daemon.stderr()
    assert time.monotonic() - signalled < 10, "the second signal must not wait out the shutdown timeout"
    _, ids, finish, usage = results["long"]
    assert finish == {0: "abort"}
    assert usage.completion_tokens == len(heads[1].token_ids) + len(ids.get(0, [])) < 480
