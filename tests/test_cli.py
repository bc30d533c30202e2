"""The `premoe` command line: every verb explains itself, every option has its PREMOE_* twin (today's names kept),
a bad option is one line naming the flag with exit status 2, and the verbs work end to end, offline and against a
real server; the client verbs import no torch."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from transformers import AutoModelForCausalLM

from premoe_service.cli import cli, main
from premoe_service.cli.serve import service_config
from premoe_service.families.tiny import save_tiny_checkpoint
from premoe_service.pattern import Pattern
from premoe_service.profiler import Demo, Profile, Selection, profile_store
from premoe_service.server import running_server
from premoe_service.serving import ServiceConfig
from premoe_service.store import Store

from .test_evaluation import store_spec

KEY, TOKEN = "inference-key", "admin-token"
CODE_DEMOS = ["def add(a, b):\n    return a + b\n", "for i in range(3):\n    print(i)\n", "import os\nos.getcwd()\n"]
# Options that are actions, not settings: an environment twin would repeat the action on every call.
ACTIONS = {("tasks", "--delete"), ("route", "--evaluate")}
# The twins the command line had before click, per verb (PREMOE_ left off): scripts and compose files use them.
TODAY_TWINS = {
    "shard": "OUT QUIET",
    "export": "STORE QUIET",
    "profile": "STORE CRITERION POLICY VALUE UNIT TCESS_THRESHOLD EMBEDDER DEVICE QUIET",
    "serve": "STORE PROFILES REDIS_URL BUDGET DEVICE EMBEDDER HOST PORT METRICS_PORT HTTP_PORT ADMIN_TOKEN API_KEY "
    "CRITERION POLICY VALUE UNIT ROUTE_THRESHOLD COVERAGE_FLOOR MAX_NEW_TOKENS_LIMIT MAX_BATCH_ROWS MAX_BATCH_TOKENS "
    "MAX_QUEUE LEASE_TIMEOUT",
    "route": "PROFILES EMBEDDER SERVER TIMEOUT",
    "generate": "SERVER TIMEOUT",
    "register": "ADMIN_TOKEN SERVER TIMEOUT",
    "tasks": "ADMIN_TOKEN SERVER TIMEOUT",
    "eval": "STORE PROFILES EMBEDDER DEVICE QUIET",
    "health": "SERVER TIMEOUT",
    "bench load": "STORE REDIS_URL DEVICE",
    "bench serve": "STORE BENCH_MODEL PROFILES BENCH_CLIENTS BENCH_ROUNDS BENCH_MAX_NEW_TOKENS DEVICE BUDGET EMBEDDER "
    "BENCH_OUT BENCH_THROTTLE_MBPS QUIET",
}


def commands(group: click.Group = cli, path: tuple[str, ...] = ()) -> dict[str, click.Command]:
    """Every verb by its path ("serve", "bench load", "profile show")."""
    found: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        found[" ".join((*path, name))] = command
        if isinstance(command, click.Group):
            found.update(commands(command, (*path, name)))
    return found


def parse(verb: str, args: list[str]) -> dict[str, Any]:
    """The values `premoe VERB ARGS` would run with; nothing runs."""
    parent = click.Context(cli, info_name="premoe")
    for name in verb.split()[:-1]:
        parent = click.Context(commands()[name], info_name=name, parent=parent)
    return commands()[verb].make_context(verb.split()[-1], args, parent=parent).params


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --- declarations ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", sorted(commands()))
def test_every_verb_has_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *verb.split(), "--help")
    assert code == 0
    assert f"Usage: premoe {verb}" in out
    for param in commands()[verb].params:
        if isinstance(param, click.Option) and param.envvar:
            assert param.envvar in out, f"{verb} --help does not show {param.envvar}"


def test_every_option_has_an_environment_twin() -> None:
    for verb, command in commands().items():
        for param in command.params:
            if isinstance(param, click.Option) and (verb, param.opts[-1]) not in ACTIONS:
                assert isinstance(param.envvar, str) and param.envvar.startswith("PREMOE_"), (verb, param.opts)
                assert re.fullmatch(r"PREMOE_[A-Z0-9_]+", param.envvar), (verb, param.envvar)  # a name a shell takes
                assert param.show_envvar, (verb, param.opts)


def test_todays_environment_names_are_kept() -> None:
    for verb, names in TODAY_TWINS.items():
        twins = {p.envvar for p in commands()[verb].params if isinstance(p, click.Option)}
        missing = {f"PREMOE_{name}" for name in names.split()} - twins
        assert not missing, f"premoe {verb} lost {missing}"


def test_every_service_config_field_has_a_serve_flag() -> None:
    flags = {p.name for p in commands()["serve"].params}
    fields = {f.name for f in dataclasses.fields(ServiceConfig)} - {"selection"}
    assert fields <= flags, f"no serve flag for {fields - flags}"
    assert {"criterion", "policy", "value", "unit"} <= flags  # the default Selection


def test_serve_reads_every_knob_from_its_twin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {
        "STORE": str(tmp_path),
        "BUDGET": "25%",
        "PORT": "0",
        "HTTP_PORT": "8123",
        "METRICS_PORT": "9123",
        "API_KEY": "k",
        "CRITERION": "tcess",
        "POLICY": "top_k",
        "VALUE": "4",
        "UNIT": "experts",
        "COVERAGE_FLOOR": "0.25",
        "MAX_PROMPT_TOKENS": "77",
        "MAX_QUEUE": "9",
        "JOIN_WAIT_STEPS": "0",
        "PRELOAD": "code,math",
        "LEASE_TIMEOUT": "12.5",
        "GRACE": "3",
        "MAX_DEMOS": "7",
        "ALLOW_INSECURE_ADMIN": "1",
        "TLS_CERT": str(tmp_path / "cert.pem"),
        "TLS_KEY": str(tmp_path / "key.pem"),
    }
    (tmp_path / "cert.pem").write_text("certificate")  # the config checks that the files exist; the server reads them
    (tmp_path / "key.pem").write_text("key")
    for name, value in env.items():
        monkeypatch.setenv(f"PREMOE_{name}", value)
    config = service_config(parse("serve", ["--grace", "5"]))  # a flag beats its twin
    assert config.store == tmp_path and config.budget == "25%" and config.port == 0
    assert (config.http_port, config.metrics_port, config.api_key) == (8123, 9123, "k")
    assert config.selection == Selection("tcess", "top_k", 4.0, "experts")
    assert (config.coverage_floor, config.max_prompt_tokens, config.max_queue, config.join_wait_steps) == (
        0.25,
        77,
        9,
        0,
    )
    assert config.preload == ("code", "math")
    assert (config.lease_timeout_s, config.grace_s) == (12.5, 5.0)
    assert config.max_demos == 7 and config.allow_insecure_admin is True
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (
        tmp_path / "cert.pem",
        tmp_path / "key.pem",
        None,
    )


def test_serve_defaults_are_the_config_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("PREMOE_"):
            monkeypatch.delenv(name)
    assert service_config(parse("serve", ["--store", str(tmp_path)])) == ServiceConfig(store=tmp_path)


def test_client_verbs_read_the_server_and_credentials_from_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREMOE_SERVER", "db:7000")
    monkeypatch.setenv("PREMOE_TIMEOUT", "2.5")
    monkeypatch.setenv("PREMOE_API_KEY", "k")
    monkeypatch.setenv("PREMOE_ADMIN_TOKEN", "t")
    params = parse("tasks", [])
    assert (params["server"], params["timeout"], params["api_key"], params["admin_token"]) == ("db:7000", 2.5, "k", "t")
    monkeypatch.setenv("PREMOE_BENCH_ROUNDS", "9")
    assert parse("bench serve", [])["rounds"] == 9


@pytest.mark.parametrize(
    ("args", "env", "flag"),
    [
        (["--budget", "lots"], {}, "--budget"),
        (["--budget", "0"], {}, "--budget"),
        (["--port", "70000"], {}, "--port"),
        ([], {"PREMOE_HTTP_PORT": "eighty"}, "--http-port"),
        (["--criterion", "magic"], {}, "--criterion"),
        (["--max-queue", "0"], {}, "--max-queue"),
        (["--coverage-floor", "2"], {}, "--coverage-floor"),
        (["--embedder-precision", "float16"], {}, "--embedder-precision"),
        (["--max-kv-tokens", "0"], {}, "--max-kv-tokens"),
        ([], {"PREMOE_EMBEDDER_PRECISION": "fp16"}, "--embedder-precision"),
        (["--tls-cert", "/no/such/cert.pem"], {}, "--tls-cert"),
        (["--bogus"], {}, "--bogus"),
    ],
)
def test_a_bad_option_is_one_line_naming_the_flag(
    args: list[str], env: dict[str, str], flag: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = run(capsys, "serve", "--store", str(tmp_path), *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("premoe serve: error: ")
    assert flag in err and "Traceback" not in err


def test_a_domain_error_names_the_flag_it_came_from(tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "serve", "--store", str(tmp_path), "--device", "tpu")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'--device'" in err and "tpu" in err
    code, _, err = run(capsys, "serve", "--store", str(tmp_path))  # a folder that is no store
    assert code == 2 and "'--store'" in err and "manifest.json" in err


# --- offline verbs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    save_tiny_checkpoint(root / "ckpt", "qwen3_moe")
    assert main(["shard", str(root / "ckpt"), "--out", str(root / "store"), "--quiet"]) == 0
    return root / "store"


def test_profile_show_and_export(tiny_store: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"text": "def f(x):\\n    return x"}\n{"prompt": "1+2=", "answer": "3"}\n')
    monkeypatch.setenv("PREMOE_STORE", str(tiny_store))  # the environment twin of --store
    out = tmp_path / "code.safetensors"
    code, _, _ = run(
        capsys, "profile", "--task", "code", "--demos", str(demos), "--out", str(out), "--no-embed", "--quiet"
    )
    assert code == 0
    profile = Profile.load(out)
    assert profile.name == "code" and set(profile.scores) == {"frequency", "tcess", "easyep", "reap"}

    code, text, _ = run(capsys, "profile", "show", str(out), "--png", str(tmp_path / "heat.png"))
    assert code == 0 and "task code" in text and "layer   0" in text
    assert (tmp_path / "heat.png").read_bytes()[:4] == b"\x89PNG"

    pattern = tmp_path / "pattern.json"
    pattern.write_text(json.dumps({"format": 1, "layers": {str(i): [0, 2, 4, 6] for i in range(3)}}))
    assert main(["export", "--pattern", str(pattern), "--out", str(tmp_path / "pruned"), "--quiet"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").config.num_experts == 4


def test_profile_without_its_required_options_is_a_usage_error(tiny_store: Path, capsys) -> None:
    code, _, err = run(capsys, "profile", "--store", str(tiny_store), "--demos", __file__, "--out", "x")
    assert code == 2 and "Missing option '--task'" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def code_profile(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    profile, _ = profile_store(Store(tiny_store), "code", [Demo(prompt=d) for d in CODE_DEMOS])
    path = tmp_path_factory.mktemp("profiles") / "code.safetensors"
    profile.save(path)
    return path


def test_pattern_keeps_the_best_experts_of_every_layer(tiny_store: Path, code_profile: Path, tmp_path: Path, capsys):
    out = tmp_path / "top.json"
    code, text, _ = run(
        capsys, "pattern", str(code_profile), "--store", str(tiny_store), "--out", str(out), "--policy", "top_k"
    )
    assert code == 0 and f"pattern {out}" in text
    spec = store_spec(Store(tiny_store))
    pattern = Pattern.from_json(spec, json.loads(out.read_text()))
    scores = Profile.load(code_profile).score("easyep")  # the profile's criterion: the default Selection's
    per_layer = spec.num_experts // 2  # budget 0.5 of the routed experts, the same count in every layer
    for row, layer in enumerate(spec.moe_layers):
        best = torch.sort(scores[row].double().clamp_min(0), descending=True, stable=True).indices[:per_layer]
        assert pattern.kept(layer) == tuple(sorted(best.tolist()))
    # a checkpoint has one expert count, and top_k gives it one
    assert main(["export", "--store", str(tiny_store), "--pattern", str(out), "--out", str(tmp_path / "p")]) == 0


def test_pattern_budget_in_bytes_and_as_a_share(tiny_store: Path, code_profile: Path, tmp_path: Path, capsys) -> None:
    store = Store(tiny_store)
    spec = store_spec(store)
    total = spec.num_experts * len(spec.moe_layers)
    for budget, experts in [("25%", total // 4), (f"{9 * store.manifest.expert_nbytes}B", 9)]:
        out = tmp_path / "p.json"
        args = ["pattern", str(code_profile), "--store", str(tiny_store), "--out", str(out), "--budget", budget]
        code, _, _ = run(capsys, *args, "--criterion", "tcess")
        assert code == 0
        assert Pattern.from_json(spec, json.loads(out.read_text())).size == experts


def test_pattern_rejects_contradictory_options(tiny_store: Path, code_profile: Path, tmp_path: Path, capsys) -> None:
    base = ["pattern", str(code_profile), "--store", str(tiny_store), "--out", str(tmp_path / "p.json")]
    code, _, err = run(capsys, *base, "--coverage", "0.9")  # coverage goes with --policy coverage
    assert code == 2 and "--coverage" in err
    code, _, err = run(capsys, *base, "--budget", "half")
    assert code == 2 and "'--budget'" in err
    assert not (tmp_path / "p.json").exists()
    code, _, _ = run(capsys, *base, "--policy", "coverage", "--coverage", "0.9")
    assert code == 0


def test_errors_are_one_line_naming_the_field(tmp_path: Path, tiny_store: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    args = ["--task", "x", "--demos", str(bad), "--out", str(tmp_path / "x.safetensors"), "--no-embed", "--quiet"]
    code, _, err = run(capsys, "profile", "--store", str(tiny_store), *args)
    assert code == 2 and "bad.jsonl line 2" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "def f(x):\\n    return x"}\n')
    examples = tmp_path / "examples.jsonl"
    examples.write_text('{"text": "print(1)"}\n{"answer": "no text"}\n')
    args[3] = str(good)
    code, _, err = run(capsys, "profile", "--store", str(tiny_store), *args, "--examples", str(examples))
    assert code == 2 and "examples.jsonl line 2" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()
    code, _, err = run(capsys, "shard", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s2"))
    assert code == 2 and "MODEL_DIR" in err


def test_route_evaluate_reports_accuracy_and_threshold(tmp_path: Path, demo_profiles, held_out_queries, capsys):
    for profile in demo_profiles.values():
        profile.save(tmp_path / f"{profile.name}.safetensors")
    queries = tmp_path / "queries.jsonl"
    records = [{"query": q, "task": t} for q, t in held_out_queries] + [{"query": "zxqv blorf 7781 qqq", "task": None}]
    queries.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, _ = run(capsys, "route", "--evaluate", str(queries), "--profiles", str(tmp_path))
    assert code == 0 and "top-1 accuracy      1.000" in out and "suggested threshold" in out
    assert "on-task rejected    0.000" in out and "off-topic rejected  1.000" in out
    assert "per task" in out and "confusion" in out and f"{'(none)':<16}" in out


# --- client verbs against a real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_store: Path, code_profile: Path, embedder) -> Any:
    config = ServiceConfig(
        store=tiny_store, profiles=code_profile.parent, port=0, device="cpu", api_key=KEY, admin_token=TOKEN
    )
    with running_server(config, embedder=embedder) as (_, port):
        yield f"127.0.0.1:{port}"


def test_client_verbs_send_the_api_key(server: str, capsys) -> None:
    code, out, _ = run(capsys, "tasks", "--server", server, "--api-key", KEY)
    assert code == 0 and out.splitlines()[1].startswith("code ")
    code, out, err = run(capsys, "tasks", "--server", server)  # no key: the server refuses, in one line
    assert code == 1 and out == "" and err.startswith("premoe tasks: UNAUTHENTICATED:") and len(err.splitlines()) == 1
    code, out, _ = run(capsys, "health", "--server", server)  # health needs no key
    assert (code, out) == (0, "SERVING\n")


def test_generate_then_stats_count_the_request(server: str, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PREMOE_SERVER", server)
    monkeypatch.setenv("PREMOE_API_KEY", KEY)
    code, _, before = run(capsys, "stats", "--json")
    requests_before = {t["task"]: int(t["requests"]) for t in json.loads(before.strip() or "{}").get("tasks", [])}
    code, out, err = run(capsys, "generate", "def mul(a, b):", "--task", "code", "--max-new-tokens", "3")
    assert code == 0 and "task code (" in err
    code, out, _ = run(capsys, "stats", "--json")
    stats = json.loads(out)
    assert code == 0
    assert {t["task"]: int(t["requests"]) for t in stats["tasks"]}["code"] == requests_before.get("code", 0) + 1
    assert 0 < stats["resident_experts"] <= stats["capacity_experts"]
    assert stats["cache_health"] == "ok" and set(stats["loads"]) >= {"device", "cache", "disk"}
    code, text, _ = run(capsys, "stats")
    assert code == 0
    assert f"{stats['resident_experts']}/{stats['capacity_experts']} experts resident" in text
    assert any(line.split()[:1] == ["code"] for line in text.splitlines())


def test_register_needs_the_admin_token(server: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PREMOE_SERVER", server)
    monkeypatch.setenv("PREMOE_API_KEY", KEY)
    demos = tmp_path / "d.jsonl"
    demos.write_text("".join(json.dumps({"text": t}) + "\n" for t in CODE_DEMOS))
    code, _, err = run(capsys, "register", "py", "--demos", str(demos), "--dry-run")
    assert code == 1 and "PERMISSION_DENIED" in err
    code, out, _ = run(capsys, "register", "py", "--demos", str(demos), "--dry-run", "--admin-token", TOKEN)
    assert code == 0 and out.startswith("task py profiled (dry run)")
    examples = tmp_path / "e.jsonl"
    examples.write_text('{"text": "print(sum(range(3)))"}\n')
    with_examples = ["--examples", str(examples), "--dry-run", "--admin-token", TOKEN]
    code, out, _ = run(capsys, "register", "py", "--demos", str(demos), *with_examples)
    assert code == 0 and out.startswith("task py profiled (dry run)")
    examples.write_text('{"text": "print(1)"}\n{"text": ""}\n')
    code, _, err = run(capsys, "register", "py", "--demos", str(demos), *with_examples)
    assert code == 2 and "e.jsonl line 2" in err and "Traceback" not in err


def test_client_verbs_import_no_torch(server: str) -> None:
    script = (
        "import sys\n"
        "from premoe_service.cli import main\n"
        f"codes = [main(['tasks', '--server', {server!r}, '--api-key', {KEY!r}]),"
        f" main(['stats', '--server', {server!r}, '--api-key', {KEY!r}]),"
        f" main(['health', '--server', {server!r}])]\n"
        "import premoe_service.client\n"
        "print('torch loaded' if 'torch' in sys.modules else 'no torch', codes)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "no torch [0, 0, 0]"
