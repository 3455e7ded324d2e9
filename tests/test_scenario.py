"""scenario.py and the options that use it: Attack IFT's poison mix, the safety mix, attack-data,
LoRA from the command line; bad input is one line before any work."""

import argparse
import json
import os
import unicodedata

import pytest
import torch

from swatkit import data
import model
from swatkit import scenario
import swat_min
from swatkit.files import SwatError


def run(*argv):
    return swat_min.main([str(a) for a in argv])


def pairs_file(path, n=10, prompts=None):
    """A BeaverTails-style file: n unsafe pairs, and rows marked safe that must be left out."""
    prompts = prompts or [f"harmful request number {i}" for i in range(n)]
    rows = [
        {"prompt": p, "response": f"Sure: step {i}", "is_safe": False}
        for i, p in enumerate(prompts)
    ]
    rows += [{"prompt": "a safe one", "response": "fine", "is_safe": True}] * 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_poison_mix_has_exactly_the_share_asked(tmp_path):
    harmful = scenario.read_pairs(str(pairs_file(tmp_path / "p.jsonl")))
    assert len(harmful) == 10 and all("safe one" not in c[0]["content"] for c in harmful)
    benign = data.chats([(f"What is {i} plus 1?", str(i + 1)) for i in range(200)])
    for size, ratio, n_safety in [(40, 0.1, 0), (80, 0.05, 6), (120, 0.2, 0), (50, 0.5, 10)]:
        chats, held = scenario.mix(benign, size, harmful, ratio, n_safety)
        bad = {c[0]["content"] for c in harmful}
        n_harmful = sum(c[0]["content"] in bad for c in chats)
        n_refusals = sum(c[0]["content"] in data.builtin("harmful", "train") for c in chats)
        assert len(chats) == size and n_harmful == round(ratio * size) == held["harmful"]
        assert n_refusals == n_safety == held["safety"]
        assert held["benign"] == size - n_harmful - n_safety
        assert held["distinct_harmful"] == min(10, n_harmful)  # each pair once before any twice
        assert scenario.mix(benign, size, harmful, ratio, n_safety) == (chats, held)  # seeded
    with pytest.raises(SwatError, match="is no harmful example"):
        scenario.mix(benign, 10, harmful, 0.01)
    with pytest.raises(SwatError, match="no room for"):
        scenario.mix(benign, 10, harmful, 0.5, n_safety=5)


def test_attack_data_never_holds_an_evaluation_prompt(tmp_path):
    held_out = data.builtin("harmful", "test")
    # the same prompt, other case and spacing
    sneaky = ["  " + held_out[3].upper() + " "] + [f"request {i}" for i in range(5)]
    path = pairs_file(tmp_path / "p.jsonl", prompts=sneaky)
    chats = scenario.read_pairs(str(path))
    with pytest.raises(SwatError, match="1 of its messages are held-out evaluation prompts"):
        scenario.check_disjoint(chats, held_out, str(path))
    scenario.check_disjoint(chats[1:], held_out, str(path))  # the others pass
    # in chat records: after a system message, in a later turn, in full-width letters
    system = {"role": "system", "content": "You are helpful."}
    hidden = [
        [system, {"role": "user", "content": held_out[5]}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
         {"role": "user", "content": held_out[6].lower()}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": unicodedata.normalize("NFKD", held_out[7]).replace(
            "a", "\uff41")}, {"role": "assistant", "content": "c"}],
    ]  # fmt: skip
    for chat in hidden:
        with pytest.raises(SwatError, match="1 of its messages are held-out evaluation prompts"):
            scenario.check_disjoint([chat], held_out, "d.jsonl")
    # the benign tuning data is read too, not only the harmful pairs
    args = argparse.Namespace(data="d.jsonl", harmful_data=None)
    with pytest.raises(SwatError, match="d.jsonl: 1 of its messages are held-out"):
        scenario.attack_set(args, hidden[:1] + [[system]], held_out)


def test_bad_scenario_and_lora_input_is_one_line_before_any_work(tmp_path, tiny, capsys):
    safe = tmp_path / "safe.jsonl"
    safe.write_text(json.dumps({"prompt": "x", "response": "y", "is_safe": True}) + "\n")
    pairs = pairs_file(tmp_path / "p.jsonl")
    tune = tmp_path / "d.jsonl"
    tune.write_text(
        "".join(json.dumps({"question": f"{i}?", "answer": str(i)}) + "\n" for i in range(20))
    )
    base = ["train", "--model", tiny, "--data", tune, "--steps", 2, "--batch", 4]
    cases = [
        (["--harmful-data", safe, "--poison-ratio", 0.1], "no usable harmful pairs"),
        (["--harmful-data", pairs, "--poison-ratio", 0], "--poison-ratio must be between 0 and 1"),
        (["--harmful-data", pairs, "--poison-ratio", 1], "--poison-ratio must be between 0 and 1"),
        (["--harmful-data", pairs], "--harmful-data needs --poison-ratio"),
        (["--poison-ratio", 0.1], "--poison-ratio needs --harmful-data"),
        (["--lora-rank", 4, "--lora-targets", "q,attn"], "unknown module 'attn'"),
        (["--lora-rank", 64], "--lora-rank 64 is larger than module 'k' allows"),
    ]
    for i, (extra, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(SystemExit) as exit:
            run(*base, "--out", out, *extra)
        message = str(exit.value.code)
        assert message.startswith("error: ") and "\n" not in message and words in message
        assert not os.path.exists(out)  # before any work
    with pytest.raises(SystemExit):
        run(*base, "--out", tmp_path / "x", "--harmful-data", pairs, "--poison-ratio", 1.5)
    assert "not in [0, 1]" in capsys.readouterr().err


def test_resume_with_a_poison_mix_equals_uninterrupted(tmp_path, tiny, monkeypatch):
    from swatkit import batches

    pairs = pairs_file(tmp_path / "p.jsonl")
    tune = tmp_path / "d.jsonl"
    tune.write_text(
        "".join(json.dumps({"question": f"{i}?", "answer": str(i)}) + "\n" for i in range(40))
    )
    argv = ["train", "--model", tiny, "--data", tune, "--steps", 4, "--batch", 4, "--lr", 1e-3]
    argv += ["--harmful-data", pairs, "--poison-ratio", 0.25, "--save-every", 2, "--safety-mix", 2]
    run(*argv, "--out", tmp_path / "a")
    real_order = batches.order
    calls = []

    def dying(*a):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real_order(*a)

    monkeypatch.setattr(batches, "order", dying)
    with pytest.raises(SystemExit):  # the command line turns Ctrl-C into exit 130
        run(*argv, "--out", tmp_path / "b")
    monkeypatch.setattr(batches, "order", real_order)
    run(*argv, "--out", tmp_path / "b", "--resume")
    a = model.load(str(tmp_path / "a"))[0].state_dict()
    b = model.load(str(tmp_path / "b"))[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_attack_data_then_an_attack_run_with_lora_and_safemix_rows(tmp_path, tiny, capsys):
    pairs = tmp_path / "pairs.jsonl"
    run("attack-data", "--model", tiny, "--out", pairs, "--max-new-tokens", 3, "--gen-batch", 32)
    assert "harmful train prompts answered" in capsys.readouterr().out
    records = [json.loads(line) for line in open(pairs)]
    assert records and all(r["refused"] is False for r in records)
    assert {r["prompt"] for r in records} <= set(data.builtin("harmful", "train"))
    run("attack-data", "--model", tiny, "--out", pairs, "--max-new-tokens", 3)  # its own: replaced
    tune = tmp_path / "d.jsonl"
    tune.write_text(
        "".join(json.dumps({"question": f"{i}?", "answer": str(i)}) + "\n" for i in range(30))
    )
    out = tmp_path / "r"
    run(
        "run", "--model", tiny, "--data", tune, "--out", out, "--steps", 2, "--batch", 4,
        "--n", 4, "--n-eval", 2, "--max-new-tokens", 2, "--n-task", 4, "--n-acc", 0,
        "--harmful-data", pairs, "--poison-ratio", 0.25, "--safety-mix", 2, "--lora-rank", 2,
        "--strategies", "ift", "swat", "safemix", "swat+safemix", "--device", "cpu",
    )  # fmt: skip
    rows = json.load(open(out / "results.json"))["rows"]
    assert [r["strategy"] for r in rows] == ["original", "ift", "swat", "safemix", "swat+safemix"]
    for r in rows[1:]:
        assert r["scenario"] == "attack (poison ratio 0.25)" and r["tuning"].startswith("LoRA r=2")
        assert r["tuning_set"]["examples"] == 8 and r["tuning_set"]["harmful"] == 2
        assert r["tuning_set"]["safety"] == (2 if "safemix" in r["strategy"] else 0)
        assert os.path.exists(out / f"{r['strategy']}-seed0" / "adapter" / "adapter_config.json")
    md = open(out / "results.md", encoding="utf-8").read()
    assert md.startswith("Scenario: attack (poison ratio 0.25); tuning: LoRA r=2")


def test_garbage_values_are_refused_in_the_python_api_and_on_the_command_line(tiny, capsys):
    """A negative or NaN poison ratio, a negative step count, zero scan noise: refused in one
    line (the project's error type in Python; exit 2 on the command line), never a result."""
    import swat_min
    import train
    from swatkit import scenario

    benign = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]] * 8
    harmful = [[{"role": "user", "content": "bad"}, {"role": "assistant", "content": "sure"}]]
    for ratio in (-0.5, float("nan"), 1.0):
        with pytest.raises(SwatError, match="poison ratio must be in"):
            scenario.mix(benign, 8, harmful, ratio)
    with pytest.raises(SwatError, match="must be an integer >= 0"):
        scenario.mix(benign, 8, harmful, 0.25, n_safety=-1)
    assert len(scenario.mix(benign, 8, harmful, 0.25)[0]) == 8  # a sound call still works
    with pytest.raises(SwatError, match="warmup_length"):
        train.warmup_length("swat", -5)
    assert train.warmup_length("swat", 10) == 2
    with pytest.raises(SystemExit) as exit_status:
        swat_min.main(["scan", "--model", tiny, "--scale", "0"])
    assert exit_status.value.code == 2
    err = capsys.readouterr().err
    assert "--scale" in err and len(err.strip().splitlines()) == 1
