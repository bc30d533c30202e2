"""What the field's clients send to the HTTP door, as vLLM's OpenAI server takes it: string, list and token-id
prompts (token ids used as given, strings with the tokenizer's BOS), echo whose text, tokens and offsets agree,
`ignore_eos`/`min_tokens`/`stop_token_ids` against transformers' own `generate`, stream usage options, the
tokenizer endpoints, the whole model by its name (refused when the budget cannot hold it) and chat templates."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import GenerationConfig

from premoe_service.client import PreMoeClient
from premoe_service.families.tiny import BOS, save_tiny_checkpoint, tiny_model
from premoe_service.server import running_server
from premoe_service.serving import ServiceConfig
from premoe_service.store import shard

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "def add(a, b):"
WHOLE = "whole-model"  # --served-model-name
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"


@pytest.fixture(scope="module")
def reference():
    """The checkpoint's model in transformers, unmodified (every expert)."""
    return tiny_model("qwen3_moe").eval()


@pytest.fixture(scope="module")
def eos_id(reference) -> int:
    """An EOS that greedy decoding of PROMPT (BOS first) reaches early: the first new token after the first that
    did not come before."""
    tokenizer = _bos_tokenizer()
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        out = reference.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    new = out[0, ids.shape[1] :].tolist()
    return int(next(token for i, token in enumerate(new) if i and token not in new[:i]))


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedder, eos_id):
    """The tiny checkpoint with a tokenizer that adds BOS, `eos_id` as its EOS, a chat template file and a
    served model name."""
    root = tmp_path_factory.mktemp("fields")
    save_tiny_checkpoint(root / "ckpt", "qwen3_moe")
    _bos_tokenizer().save_pretrained(root / "ckpt")
    GenerationConfig(eos_token_id=eos_id, pad_token_id=0).save_pretrained(root / "ckpt")
    config = json.loads((root / "ckpt" / "config.json").read_text())
    (root / "ckpt" / "config.json").write_text(json.dumps(config | {"eos_token_id": eos_id}))
    shard(root / "ckpt", root / "store", progress=False)
    (root / "chat.jinja").write_text(TEMPLATE)
    config = ServiceConfig(
        store=root / "store",
        profiles=root / "profiles",
        port=0,
        http_port=0,
        device="cpu",
        served_model_name=WHOLE,
        chat_template=root / "chat.jinja",
        admin_token="admin",
    )
    with running_server(config, embedder=embedder) as (handle, port):
        yield handle, port


def _bos_tokenizer():
    from premoe_service.families.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    bos = tokenizer.convert_tokens_to_ids(BOS)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos)]
    )
    return tokenizer


def client(handle) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{handle.http_port}/v1", api_key="x", max_retries=0, timeout=60)


def post(handle, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{handle.http_port}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def greedy(model, ids: list[int], new: int, **options) -> list[int]:
    """transformers' own greedy continuation of exactly `ids`."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=0, **options)
    return out[0, len(ids) :].tolist()


def test_string_prompts_get_bos_and_token_ids_are_used_as_given(server, reference, eos_id) -> None:
    handle, _ = server
    tokenizer = _bos_tokenizer()
    ids = tokenizer(PROMPT)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(PROMPT) + 1
    bare = ids[1:]
    api = client(handle)
    options = {"model": WHOLE, "max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}
    by_text = api.completions.create(prompt=PROMPT, **options)
    assert by_text.usage.prompt_tokens == len(ids)
    assert by_text.model_extra["premoe"]["token_ids"] == greedy(reference, ids, 6, eos_token_id=None)
    by_ids = api.completions.create(prompt=bare, **options)  # no BOS: none is added
    assert by_ids.usage.prompt_tokens == len(bare)
    assert by_ids.model_extra["premoe"]["token_ids"] == greedy(reference, bare, 6, eos_token_id=None)
    no_special = api.completions.create(
        prompt=PROMPT, **options | {"extra_body": {"ignore_eos": True, "add_special_tokens": False}}
    )
    assert no_special.model_extra["premoe"]["token_ids"] == by_ids.model_extra["premoe"]["token_ids"]
    # Lists: one choice per prompt, in order, each what it gets alone; usage adds them up.
    many = api.completions.create(prompt=[PROMPT, "x = 1"], **options)
    alone = api.completions.create(prompt="x = 1", **options)
    assert [c.index for c in many.choices] == [0, 1]
    assert [c.text for c in many.choices] == [by_text.choices[0].text, alone.choices[0].text]
    assert many.usage.prompt_tokens == by_text.usage.prompt_tokens + alone.usage.prompt_tokens
    assert many.usage.completion_tokens == 12
    id_lists = api.completions.create(prompt=[bare, tokenizer("x = 1")["input_ids"]], **options)
    assert [c.text for c in id_lists.choices] == [by_ids.choices[0].text, alone.choices[0].text]


def test_echo_text_tokens_and_offsets_agree(server, reference) -> None:
    """The echoed prompt shows the BOS the server added, as its tokens and offsets count it."""
    handle, _ = server
    tokenizer = _bos_tokenizer()
    reply = client(handle).completions.create(
        model=WHOLE, prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    choice = reply.choices[0]
    logprobs = choice.logprobs
    ids = tokenizer(PROMPT)["input_ids"] + reply.model_extra["premoe"]["token_ids"]
    assert choice.text.startswith(BOS + PROMPT) and "".join(logprobs.tokens) == choice.text
    ends = [*logprobs.text_offset[1:], len(choice.text)]
    assert [choice.text[a:b] for a, b in zip(logprobs.text_offset, ends, strict=True)] == logprobs.tokens
    with torch.no_grad():
        expected = torch.log_softmax(reference(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    assert len(logprobs.token_logprobs) == len(ids) and logprobs.token_logprobs[0] is None
    for position in range(1, len(ids)):
        assert abs(logprobs.token_logprobs[position] - float(expected[position - 1, ids[position]])) < 1e-4
    # Token ids echo as given: no BOS.
    bare = client(handle).completions.create(
        model=WHOLE, prompt=ids[1:-1], max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    assert bare.choices[0].text.startswith(PROMPT) and len(bare.choices[0].logprobs.tokens) == len(ids) - 1


def test_eos_options_match_transformers_generate(server, reference, eos_id) -> None:
    """The checkpoint's EOS comes early under greedy decoding: it ends the request unless `ignore_eos`;
    `min_tokens` holds it (and `stop_token_ids`) back as transformers' `min_new_tokens` does."""
    handle, _ = server
    ids = _bos_tokenizer()(PROMPT)["input_ids"]
    api = client(handle)
    base = {"model": WHOLE, "prompt": PROMPT, "max_tokens": 10, "temperature": 0}

    def tokens(reply) -> list[int]:
        return reply.model_extra["premoe"]["token_ids"]

    plain = api.completions.create(**base)
    assert tokens(plain) == greedy(reference, ids, 10, eos_token_id=eos_id) and tokens(plain)[-1] == eos_id
    assert plain.choices[0].finish_reason == "stop"
    ignoring = api.completions.create(**base, extra_body={"ignore_eos": True})
    assert tokens(ignoring) == greedy(reference, ids, 10, eos_token_id=None) and len(tokens(ignoring)) == 10
    assert ignoring.choices[0].finish_reason == "length" and ignoring.usage.completion_tokens == 10
    held = api.completions.create(**base, extra_body={"min_tokens": 6})
    expected = greedy(reference, ids, 10, eos_token_id=eos_id, min_new_tokens=6)
    assert tokens(held) == expected and len(expected) >= 6
    stop_at = tokens(ignoring)[4]
    first = tokens(ignoring).index(stop_at)
    stopped = api.completions.create(**base, extra_body={"ignore_eos": True, "stop_token_ids": [stop_at]})
    assert tokens(stopped) == tokens(ignoring)[: first + 1] and stopped.choices[0].finish_reason == "stop"
    sampled = {"temperature": 1.0, "seed": 7, "extra_body": {"min_tokens": 8, "stop_token_ids": [stop_at]}}
    drawn = api.completions.create(**base | sampled)
    assert eos_id not in tokens(drawn)[:8] and stop_at not in tokens(drawn)[:8]


def test_stream_options_report_usage(server) -> None:
    handle, _ = server
    api = client(handle)
    options = {"model": WHOLE, "max_tokens": 5, "temperature": 0, "stream": True}
    expected = api.completions.create(
        model=WHOLE, prompt=[PROMPT, "x = 1"], max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(
        api.completions.create(
            prompt=[PROMPT, "x = 1"],
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
            **options,
        )
    )
    for index in (0, 1):
        text = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == index)
        assert text == expected.choices[index].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == expected.usage.prompt_tokens
    continuous = list(
        api.completions.create(
            prompt=PROMPT,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body={"ignore_eos": True},
            **options,
        )
    )
    counts = [c.usage.completion_tokens for c in continuous if c.usage is not None]
    assert len(counts) == len(continuous) and counts == sorted(counts) and counts[-1] == 5


def test_tokenizer_endpoints_are_vllms(server) -> None:
    from lm_eval.utils import check_remote_tokenizer_support

    handle, _ = server
    tokenizer = _bos_tokenizer()
    status, body = post(handle, "/tokenize", {"prompt": PROMPT})
    assert status == 200 and body["tokens"] == tokenizer(PROMPT)["input_ids"] and body["count"] == len(PROMPT) + 1
    _, body = post(handle, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False})
    assert body["tokens"] == tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    _, body = post(handle, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert body["tokens"] == tokenizer("<user>hi<assistant>", add_special_tokens=False)["input_ids"]
    status, body = post(handle, "/detokenize", {"tokens": tokenizer(PROMPT)["input_ids"]})
    assert status == 200 and body["prompt"] == BOS + PROMPT
    status, body = post(handle, "/detokenize", {"tokens": [5, 500]})
    assert status == 400 and body["error"]["param"] == "tokens"
    assert "500" in body["error"]["message"] and "128" in body["error"]["message"]
    status, body = post(handle, "/tokenize", {"text": PROMPT})
    assert status == 400 and body["error"]["param"] == "text"
    assert post(handle, "/tokenize", {"prompt": PROMPT, "model": WHOLE})[0] == 200
    status, body = post(handle, "/tokenize", {"prompt": PROMPT, "model": "no-such-task"})
    assert status == 404 and body["error"]["param"] == "model"
    with urllib.request.urlopen(f"http://127.0.0.1:{handle.http_port}/tokenizer_info", timeout=30) as reply:
        info = json.loads(reply.read())
    assert info["eos_token"] == "</s>" and info["bos_token"] == BOS and info["chat_template"] == TEMPLATE
    assert check_remote_tokenizer_support(f"http://127.0.0.1:{handle.http_port}/v1/completions")


def test_the_whole_model_has_its_name(server, reference) -> None:
    handle, port = server
    api = client(handle)
    ids = [m.id for m in api.models.list()]
    assert ids[:2] == ["auto", WHOLE]
    assert api.models.retrieve(WHOLE).model_extra["premoe"]["pattern_experts"] == handle.core.spec.num_experts * 3
    with (
        PreMoeClient(f"127.0.0.1:{port}", admin_token="admin", timeout=60) as admin,
        pytest.raises(grpc.RpcError) as info,
    ):
        admin.register(WHOLE, ["def f(): pass"], experts_per_layer=2)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS and WHOLE in str(info.value.details())


def test_the_whole_model_is_refused_when_the_budget_cannot_hold_it(tiny_store, embedder, tmp_path: Path) -> None:
    config = ServiceConfig(
        store=tiny_store, profiles=tmp_path, port=0, http_port=0, device="cpu", budget="0.5", served_model_name="m"
    )
    with running_server(config, embedder=embedder) as (handle, port):
        with pytest.raises(openai.RateLimitError) as info:
            client(handle).completions.create(model="m", prompt=PROMPT, max_tokens=2)
        assert info.value.body["param"] == "budget" and "0.5" in info.value.body["message"]
        with PreMoeClient(f"127.0.0.1:{port}", timeout=60) as grpc_client, pytest.raises(grpc.RpcError) as grpc_info:
            grpc_client.generate(PROMPT, task="m", max_new_tokens=2)
        assert grpc_info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_chat_template_file_renders_chat(server, reference) -> None:
    handle, _ = server
    reply = client(handle).chat.completions.create(
        model=WHOLE,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    ids = _bos_tokenizer()("<user>hi<assistant>", add_special_tokens=False)["input_ids"]  # the template's own BOS: none
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.model_extra["premoe"]["token_ids"] == greedy(reference, ids, 4, eos_token_id=None)


def test_n_choices_per_prompt(server) -> None:
    """`n` samples per prompt (seed + j each, as vLLM draws them); prompt i's j-th is choice i * n + j; usage
    counts each prompt once. `best_of` may only equal `n`."""
    handle, _ = server
    api = client(handle)
    options = {"model": WHOLE, "max_tokens": 6, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    reply = api.completions.create(prompt=[PROMPT, "x = 1"], n=3, seed=5, **options)
    assert [c.index for c in reply.choices] == list(range(6))
    for i, prompt in enumerate([PROMPT, "x = 1"]):
        for j in range(3):
            alone = api.completions.create(prompt=prompt, seed=5 + j, **options)
            assert reply.choices[i * 3 + j].text == alone.choices[0].text
    assert len({c.text for c in reply.choices[:3]}) > 1  # different draws
    assert reply.usage.prompt_tokens == len(PROMPT) + 1 + len("x = 1") + 1 and reply.usage.completion_tokens == 36
    unseeded = api.completions.create(prompt=PROMPT, n=3, **options)
    assert len({c.text for c in unseeded.choices}) > 1
    assert len(api.completions.create(prompt=PROMPT, n=2, best_of=2, **options).choices) == 2
    for bad in ({"n": 0}, {"n": 65}, {"n": 2, "best_of": 3}):
        with pytest.raises(openai.BadRequestError) as info:
            api.completions.create(prompt=PROMPT, **options | {"extra_body": bad})
        assert info.value.body["param"] == ("best_of" if "best_of" in bad else "n")
