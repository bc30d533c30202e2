"""The OpenAI-compatible HTTP door, called with the official `openai` client: the same tokens as gRPC Generate,
streaming, task and `auto` models, OpenAI error shapes with the field named, chat templates, the API key at both
doors, and a client that goes away cancelling its request."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
import torch
from transformers import AutoTokenizer

from premoe_service.client import PreMoeClient
from premoe_service.families.tiny import save_tiny_checkpoint, tiny_model
from premoe_service.server import running_server
from premoe_service.serving import ServiceConfig
from premoe_service.store import shard

from .conftest import free_port
from .references import masked_transformers

PROMPT = "def add(a, b):"
CODE_DEMOS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "import os\nprint(os.getcwd())\n",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
API_KEY, TOKEN = "inference-key", "admin-token"


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model's store, and the same model with a chat template in its tokenizer."""
    root = tmp_path_factory.mktemp("http")
    save_tiny_checkpoint(root / "ckpt", "qwen3_moe")
    shard(root / "ckpt", root / "store", progress=False)
    shutil.copytree(root / "ckpt", root / "ckpt-chat")
    tokenizer = AutoTokenizer.from_pretrained(root / "ckpt")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(root / "ckpt-chat")
    shard(root / "ckpt-chat", root / "store-chat", progress=False)
    return {"plain": root / "store", "chat": root / "store-chat"}


@pytest.fixture(scope="module")
def server(stores, embedder, tmp_path_factory):
    """No chat template, no API key; an admin token, metrics."""
    config = ServiceConfig(
        store=stores["plain"],
        profiles=tmp_path_factory.mktemp("profiles"),
        port=0,
        http_port=0,
        device="cpu",
        admin_token=TOKEN,
        metrics_port=free_port(),
    )
    with running_server(config, embedder=embedder) as (handle, port):
        yield handle, port


@pytest.fixture(scope="module")
def keyed_server(stores, embedder, tmp_path_factory):
    """A chat template, an API key and an admin token."""
    config = ServiceConfig(
        store=stores["chat"],
        profiles=tmp_path_factory.mktemp("profiles-chat"),
        port=0,
        http_port=0,
        device="cpu",
        admin_token=TOKEN,
        api_key=API_KEY,
    )
    with running_server(config, embedder=embedder) as (handle, port):
        yield handle, port


def openai_client(handle, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{handle.http_port}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def code_task(server) -> str:
    """A task registered over gRPC, which HTTP then serves."""
    _, port = server
    with PreMoeClient(f"127.0.0.1:{port}", admin_token=TOKEN, timeout=120) as admin:
        admin.register("code", CODE_DEMOS, description="python code", experts_per_layer=4, replace=True)
    return "code"


def raw(handle, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """A request without the openai client: status and JSON body."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{handle.http_port}{path}", data=body, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_completion_has_the_tokens_of_grpc_generate(server) -> None:
    handle, port = server
    with PreMoeClient(f"127.0.0.1:{port}", timeout=60) as grpc_client:
        expected = grpc_client.generate(PROMPT, max_new_tokens=12)
    reply = openai_client(handle).completions.create(model="auto", prompt=PROMPT, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.text == expected.text and choice.finish_reason == "length"
    stats = reply.model_extra["premoe"]
    assert stats["token_ids"] == list(expected.token_ids) and len(expected.token_ids) == 12
    assert stats["decision"] == expected.stats.decision and stats["pattern_experts"] == expected.stats.pattern_experts
    assert set(stats) >= {"task", "score", "coverage", "loads", "timings"}
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens == len(PROMPT)  # one token per character
    assert reply.usage.completion_tokens == 12 and reply.usage.total_tokens == len(PROMPT) + 12
    echoed = openai_client(handle).completions.create(
        model="auto", prompt=[PROMPT], max_tokens=12, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPT + expected.text
    body = urllib.request.urlopen(f"http://127.0.0.1:{handle.metrics_port}/metrics", timeout=10).read().decode()
    assert 'premoe_request_seconds_count{code="OK",method="HTTP /v1/completions"}' in body


def test_streamed_completion_has_the_tokens_of_grpc_generate(server) -> None:
    handle, port = server
    with PreMoeClient(f"127.0.0.1:{port}", timeout=60) as grpc_client:
        full = grpc_client.generate(PROMPT, max_new_tokens=20)
        stop = full.text[len(full.text) // 2 :][:2]  # a string the greedy text reaches half-way
        expected = grpc_client.generate(PROMPT, max_new_tokens=20, stop=[stop])
    assert expected.finish_reason == "stop" and len(expected.text) < len(full.text)
    chunks = list(
        openai_client(handle).completions.create(
            model="auto", prompt=PROMPT, max_tokens=20, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1]) and len(chunks) > 2
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop"
    assert last.model_extra["premoe"]["token_ids"] == list(expected.token_ids)
    assert last.usage.completion_tokens == len(expected.token_ids)


def test_model_names_a_task_or_auto_for_retrieval(server, code_task) -> None:
    handle, port = server
    client = openai_client(handle)
    with PreMoeClient(f"127.0.0.1:{port}", timeout=60) as grpc_client:
        expected = grpc_client.generate(PROMPT, task=code_task, max_new_tokens=10)
    reply = client.completions.create(model=code_task, prompt=PROMPT, max_tokens=10, temperature=0)
    stats = reply.model_extra["premoe"]
    assert reply.model == code_task and stats["task"] == code_task and stats["decision"] == "override"
    assert stats["pattern_experts"] == 12 and stats["token_ids"] == list(expected.token_ids)
    routed = client.completions.create(model="auto", prompt="def multiply(a, b):\n    return a * b", max_tokens=2)
    assert routed.model_extra["premoe"]["decision"] == "match" and routed.model_extra["premoe"]["task"] == code_task
    assert [m.id for m in client.models.list()] == ["auto", "ckpt", code_task]  # ckpt: the whole model
    assert client.models.retrieve(code_task).model_extra["premoe"]["pattern_experts"] == 12


BAD_COMPLETIONS = [
    ({"n": 0}, 400, "n"),
    ({"best_of": 3}, 400, "best_of"),
    ({"top_k": 5}, 400, "top_k"),
    ({"repetition_penalty": 1.2}, 400, "repetition_penalty"),
    ({"no_such_field": 1}, 400, "no_such_field"),
    ({"logprobs": 21}, 400, "logprobs"),
    ({"logprobs": -1}, 400, "logprobs"),
    ({"logprobs": 1, "stream": True}, 400, "logprobs"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 100000}, 400, "max_tokens"),
    ({"temperature": -1.0}, 400, "temperature"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"top_p": 0.0}, 400, "top_p"),
    ({"stop": [""]}, 400, "stop"),
    ({"seed": -1}, 400, "seed"),
    ({"ignore_eos": "yes"}, 400, "ignore_eos"),
    ({"min_tokens": 5}, 400, "min_tokens"),  # above max_tokens
    ({"min_tokens": 2, "stop": ["x"]}, 400, "min_tokens"),
    ({"stop_token_ids": [4096]}, 400, "stop_token_ids"),
    ({"stop_token_ids": "2"}, 400, "stop_token_ids"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),  # without stream
    ({"stream": True, "stream_options": {"usage": True}}, 400, "stream_options.usage"),
    ({"add_special_tokens": 1}, 400, "add_special_tokens"),
    ({"prompt": "   "}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 2, 128]}, 400, "prompt"),  # past the vocabulary of 128
    ({"prompt": [[5, 6], [7, -1]]}, 400, "prompt[1]"),
    ({"prompt": ["ok", 5.5]}, 400, "prompt[1]"),
    ({"prompt": [PROMPT] * 65}, 400, "prompt"),
    ({"prompt": {"text": PROMPT}}, 400, "prompt"),
    ({"model": "Bad Name!"}, 400, "model"),
    ({"model": "no-such-task"}, 404, "model"),
]


@pytest.mark.parametrize(("change", "status", "param"), BAD_COMPLETIONS, ids=[p for _, _, p in BAD_COMPLETIONS])
def test_bad_input_gets_the_status_and_error_shape_of_openai(server, change, status, param) -> None:
    handle, _ = server
    request = {"model": "auto", "prompt": PROMPT, "max_tokens": 4}
    with pytest.raises(openai.APIStatusError) as info:
        openai_client(handle).completions.create(**request, extra_body=change)
    assert info.value.status_code == status
    error = info.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["message"].startswith(param) and "Traceback" not in error["message"]
    assert raw(handle, "GET", "/health") == (200, {"status": "SERVING"})  # still serving


def test_expert_skipping_is_an_extension_of_the_body(server) -> None:
    handle, port = server
    with PreMoeClient(f"127.0.0.1:{port}", timeout=60) as grpc_client:
        expected = grpc_client.generate(PROMPT, max_new_tokens=8, expert_skip_threshold=0.45)
    options = {"model": "auto", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    reply = openai_client(handle).completions.create(**options, extra_body={"expert_skip_threshold": 0.45})
    stats = reply.model_extra["premoe"]
    assert stats["token_ids"] == list(expected.token_ids)
    assert stats["expert_calls_skipped"] == expected.stats.expert_calls_skipped > 0
    with pytest.raises(openai.APIStatusError) as info:
        openai_client(handle).completions.create(**options, extra_body={"expert_skip_threshold": 1.5})
    assert info.value.status_code == 400 and info.value.body["param"] == "expert_skip_threshold"


def test_bad_bodies_and_paths_get_openai_errors(server) -> None:
    handle, _ = server
    status, body = raw(handle, "POST", "/v1/completions", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and body["error"]["param"] == "body"
    assert raw(handle, "POST", "/v1/completions", b"[1]")[1]["error"]["param"] == "body"
    status, body = raw(handle, "GET", "/v1/nowhere")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    assert raw(handle, "GET", "/v1/completions")[0] == 405
    # A body over the gRPC door's 64 MiB limit is refused from its declared length, before it is read.
    connection = http.client.HTTPConnection("127.0.0.1", handle.http_port, timeout=30)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str((64 << 20) + 1))
    connection.endheaders()
    reply = connection.getresponse()
    assert reply.status == 413 and json.loads(reply.read())["error"]["param"] == "body"
    connection.close()


def test_chat_without_a_template_uses_the_documented_default(server) -> None:
    """The tokenizer has no chat template: the default writes `role: content` lines, then `assistant:`."""
    handle, port = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    with PreMoeClient(f"127.0.0.1:{port}", timeout=60) as grpc_client:
        expected = grpc_client.generate("system: Be brief.\nuser: hi\nassistant:", max_new_tokens=6)
    reply = openai_client(handle).chat.completions.create(model="auto", messages=messages, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.model_extra["premoe"]["token_ids"] == list(expected.token_ids)


def test_chat_applies_the_tokenizers_template(keyed_server) -> None:
    handle, port = keyed_server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="}]
    prompt = "system: Be brief.\nuser: 2+2=\nassistant:"  # the template, rendered by hand
    with PreMoeClient(f"127.0.0.1:{port}", timeout=60) as grpc_client:
        expected = grpc_client.stub.Generate(
            grpc_client.request(prompt, max_new_tokens=10), metadata=[("authorization", f"Bearer {API_KEY}")]
        )
    client = openai_client(handle, API_KEY)
    reply = client.chat.completions.create(model="auto", messages=messages, max_tokens=10, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(prompt) and reply.model_extra["premoe"]["token_ids"] == list(
        expected.token_ids
    )
    chunks = list(
        client.chat.completions.create(model="auto", messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 10
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="auto", messages=[{"role": "robot", "content": "hi"}])
    assert info.value.body["param"] == "messages[0].role"


def test_the_api_key_guards_both_doors(keyed_server) -> None:
    handle, port = keyed_server
    with pytest.raises(openai.AuthenticationError) as info:
        openai_client(handle, "wrong-key").completions.create(model="auto", prompt=PROMPT, max_tokens=2)
    assert info.value.status_code == 401 and info.value.body["param"] == "authorization"
    assert raw(handle, "GET", "/v1/models")[0] == 401  # no key at all
    assert raw(handle, "GET", "/health") == (200, {"status": "SERVING"})  # health needs none
    assert (
        len(openai_client(handle, API_KEY).completions.create(model="auto", prompt=PROMPT, max_tokens=2).choices) == 1
    )
    with PreMoeClient(f"127.0.0.1:{port}", admin_token=TOKEN, timeout=60) as grpc_client:
        for call in (lambda: grpc_client.generate(PROMPT, max_new_tokens=2), grpc_client.tasks):
            with pytest.raises(grpc.RpcError) as rpc_info:
                call()
            assert rpc_info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        wrong = [("authorization", "Bearer wrong-key")]
        with pytest.raises(grpc.RpcError) as rpc_info:
            grpc_client.stub.Generate(grpc_client.request(PROMPT, max_new_tokens=2), metadata=wrong)
        assert rpc_info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        keyed = [("authorization", f"Bearer {API_KEY}")]
        assert len(grpc_client.stub.Generate(grpc_client.request(PROMPT, max_new_tokens=2), metadata=keyed).token_ids)
        assert grpc_client.health() == "SERVING"
        grpc_client.register("keyed", CODE_DEMOS[:2], experts_per_layer=3, replace=True)  # the admin token opens admin
    with PreMoeClient(f"127.0.0.1:{port}", admin_token=API_KEY, timeout=60) as key_only:
        with pytest.raises(grpc.RpcError) as rpc_info:
            key_only.register("sneaky", CODE_DEMOS[:2])
        assert rpc_info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_client_that_disconnects_cancels_its_request(server, code_task) -> None:
    handle, _ = server
    loop = handle.core.loop
    client = openai_client(handle)
    request = {"model": code_task, "prompt": "import os", "max_tokens": 240, "temperature": 0}
    alone = client.completions.create(**request)
    assert alone.choices[0].finish_reason == "length"  # it would run for 240 tokens if not cancelled
    stream = client.completions.create(**request, stream=True)
    next(iter(stream))  # the request is running
    tokens_before = loop.stats.tokens
    stream.close()
    deadline = time.monotonic() + 30
    slots = handle.core.patterned.slots.values()
    # The loop takes the request out of its batch, then gives back its pins: wait for both.
    while (loop.running or loop.waiting or sum(len(s.pins) for s in slots)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not loop.running and not loop.waiting
    assert loop.stats.tokens - tokens_before < 200  # stopped before its 240 tokens (slack for a busy machine)
    assert sum(len(slots.pins) for slots in handle.core.patterned.slots.values()) == 0


def test_health_is_503_while_shutting_down(stores, embedder, tmp_path: Path) -> None:
    config = ServiceConfig(store=stores["plain"], profiles=tmp_path, port=0, http_port=0, device="cpu", grace_s=2.0)
    with running_server(config, embedder=embedder) as (handle, _):
        assert raw(handle, "GET", "/health") == (200, {"status": "SERVING"})
        stopping = asyncio.run_coroutine_threadsafe(handle.stop(grace=2.0), handle.loop)
        time.sleep(0.05)
        assert raw(handle, "GET", "/health") == (503, {"status": "NOT_SERVING"})
        stopping.result(30)


def test_echo_with_logprobs_scores_the_prompt_as_transformers_does(server, code_task) -> None:
    """What evaluation harnesses send (lm-eval's local-completions): echo, logprobs, one new token."""
    handle, port = server
    reply = openai_client(handle).completions.create(
        model=code_task, prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=3
    )
    logprobs = reply.choices[0].logprobs
    token_ids = reply.model_extra["premoe"]["token_ids"]
    assert logprobs is not None and len(logprobs.tokens) == len(PROMPT) + 1  # one token per character, + 1
    assert "".join(logprobs.tokens) == reply.choices[0].text and logprobs.text_offset[:3] == [0, 1, 2]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    with PreMoeClient(f"127.0.0.1:{port}", timeout=60) as client:
        kept = {entry.layer: list(entry.experts) for entry in client.get_task(code_task).layers}
    reference = tiny_model("qwen3_moe")
    tokenizer = AutoTokenizer.from_pretrained(handle.core.store.dir)
    ids = tokenizer(PROMPT)["input_ids"] + token_ids
    with torch.no_grad(), masked_transformers(reference, kept):
        expected = torch.log_softmax(reference(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    for position in range(1, len(ids)):
        assert abs(logprobs.token_logprobs[position] - float(expected[position - 1, ids[position]])) < 1e-4
        best = expected[position - 1].topk(3)
        wanted = {tokenizer.decode([i]): v for i, v in zip(best.indices.tolist(), best.values.tolist(), strict=True)}
        top = logprobs.top_logprobs[position]  # text -> log-probability, as OpenAI spells it
        assert list(top) == list(wanted) and all(abs(top[k] - wanted[k]) < 1e-4 for k in top)
    assert max(logprobs.top_logprobs[-1].values()) == logprobs.token_logprobs[-1]  # greedy took the best
