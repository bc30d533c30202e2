"""The `premoe` command line: every verb explains itself, and the offline verbs work end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from premoe_service.cli import build_parser, main
from premoe_service.families.tiny import save_tiny_checkpoint
from premoe_service.profiler import Profile

VERBS = [
    "shard",
    "export",
    "profile",
    "profile-show",
    "serve",
    "route",
    "generate",
    "register",
    "tasks",
    "eval",
    "health",
    "bench",
]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"premoe {verb}" in out and "usage" in out


def test_every_option_has_an_environment_twin() -> None:
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    for action in serve._actions:
        if action.option_strings and action.dest != "help":
            assert "[env PREMOE_" in (action.help or ""), action.option_strings


def test_shard_profile_show_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    save_tiny_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"text": "def f(x):\\n    return x"}\n{"prompt": "1+2=", "answer": "3"}\n')
    assert main(["shard", str(tmp_path / "ckpt"), "--out", str(tmp_path / "store"), "--quiet"]) == 0
    monkeypatch.setenv("PREMOE_STORE", str(tmp_path / "store"))  # the environment twin of --store
    assert (
        main(
            [
                "profile",
                "--task",
                "code",
                "--demos",
                str(demos),
                "--out",
                str(tmp_path / "code.safetensors"),
                "--no-embed",
                "--quiet",
            ]
        )
        == 0
    )
    profile = Profile.load(tmp_path / "code.safetensors")
    assert profile.name == "code" and set(profile.scores) == {"frequency", "tcess", "easyep", "reap"}

    assert main(["profile", "show", str(tmp_path / "code.safetensors"), "--png", str(tmp_path / "heat.png")]) == 0
    out = capsys.readouterr().out
    assert "task code" in out and "layer   0" in out
    assert (tmp_path / "heat.png").read_bytes()[:4] == b"\x89PNG"

    pattern = tmp_path / "pattern.json"
    pattern.write_text(json.dumps({"format": 1, "layers": {str(i): [0, 2, 4, 6] for i in range(3)}}))
    assert main(["export", "--pattern", str(pattern), "--out", str(tmp_path / "pruned"), "--quiet"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").config.num_experts == 4


def test_errors_are_one_line_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    save_tiny_checkpoint(tmp_path / "ckpt", "olmoe")
    main(["shard", str(tmp_path / "ckpt"), "--out", str(tmp_path / "store"), "--quiet"])
    code = main(
        [
            "profile",
            "--store",
            str(tmp_path / "store"),
            "--task",
            "x",
            "--demos",
            str(bad),
            "--out",
            str(tmp_path / "x.safetensors"),
            "--no-embed",
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl line 2" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["shard", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s2")]) == 2
    assert "model_dir" in capsys.readouterr().err


def test_route_evaluate_reports_accuracy_and_threshold(
    tmp_path: Path, demo_profiles, held_out_queries, capsys: pytest.CaptureFixture[str]
) -> None:
    for profile in demo_profiles.values():
        profile.save(tmp_path / f"{profile.name}.safetensors")
    queries = tmp_path / "queries.jsonl"
    records = [{"query": q, "task": t} for q, t in held_out_queries] + [{"query": "zxqv blorf 7781 qqq", "task": None}]
    queries.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["route", "--evaluate", str(queries), "--profiles", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "top-1 accuracy      1.000" in out and "suggested threshold" in out
