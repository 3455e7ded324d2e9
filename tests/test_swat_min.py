"""swat_min.py end to end: the offline demo (shortened), CLI errors, hub download, atomic saving."""

import argparse
import errno
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import pytest
import torch
from swatkit import checkpoint
from swatkit import data
import evaluation
from swatkit import hub
import model
from swatkit import options
import robustness as rb
import swat_min
from conftest import ROOT, tiny_hf


def run(*argv):
    return swat_min.main([str(a) for a in argv])


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    run(
        "demo",
        "--out",
        out,
        "--toy-steps",
        60,
        "--steps",
        12,
        "--n",
        12,
        "--n-eval",
        12,
        "--n-task",
        12,
        "--n-acc",
        6,
        "--task-tokens",
        12,
        "--max-new-tokens",
        8,
    )
    res = json.load(open(out / "results.json"))
    names = [r["strategy"] for r in res["rows"]]
    assert names == ["original", "ift", "swat", "mllr", "control"]
    for r in res["rows"]:
        assert 0 <= r["asr"] <= 1 and 0 <= r["over_refusal"] <= 1
        assert r["task_loss"] > 0 and r["drift"] >= 0 and "settings" in r and "seed" in r
    assert res["rows"][0]["drift"] == 0
    scan = json.load(open(out / "scan.json"))
    # the searched Mods_Rob: at most half of 4 layers x q,k,v,o; the control is as large
    n_rob = len(scan["mods_rob"])
    assert 1 <= n_rob <= 8 and len(scan["mods_fragile"]) == n_rob
    assert scan["selection"]["method"] == "search" and scan["stability"]["draws"] == 1
    ctl = next(r for r in res["rows"] if r["strategy"] == "control")
    assert ctl["n_mods"] == n_rob and ctl["scheme"] == "swat"
    for r in res["rows"][1:]:  # the mechanism: how far Mods_Rob and the rest moved
        assert r["update_mods_rob"] >= 0 and r["update_rest"] >= 0
        assert os.path.exists(out / f"updates-{r['strategy']}-seed0.svg")
    assert os.path.exists(out / "scan.svg") and os.path.exists(out / "scan-search.svg")
    assert os.path.exists(out / "results.md") and os.path.exists(
        out / "swat-seed0" / "generations.jsonl"
    )
    assert all("asr_cut_vs_ift" in r and "task_loss_vs_ift" in r for r in res["rows"][1:])
    gen = [json.loads(l) for l in open(out / "swat-seed0" / "generations.jsonl")]
    assert len(gen) == 24 and {"prompt", "response", "refused", "harmful"} <= set(gen[0])


def test_run_makes_the_chosen_strategies(tmp_path, tiny):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": f"What is {i} plus 1?", "output": f"{i + 1}"}) + "\n"
            for i in range(12)
        )
    )
    out = tmp_path / "r"
    run(
        "run",
        "--model",
        tiny,
        "--data",
        data,
        "--out",
        out,
        "--steps",
        2,
        "--batch",
        4,
        "--n",
        4,
        "--n-eval",
        3,
        "--max-new-tokens",
        2,
        "--n-task",
        4,
        "--n-acc",
        0,
        "--strategies",
        "ift",
        "control",
        "--control",
        "mllr",
        "--scope",
        "modules",
        "--device",
        "cpu",
    )
    rows = json.load(open(out / "results.json"))["rows"]
    assert [r["strategy"] for r in rows] == ["original", "ift", "control"]
    assert rows[2]["scheme"] == "mllr" and rows[2]["settings"]["scope"] == "modules"
    assert not os.path.exists(out / "swat-seed0") and os.path.exists(
        out / "control-seed0" / "model.safetensors"
    )


def test_report_sets_each_strategy_against_ift(tmp_path):
    row = lambda s, seed, asr, loss: {
        "strategy": s,
        "seed": seed,
        "asr": asr,
        "over_refusal": 0.0,
        "drift": 1.0,
        "task_loss": loss,
        "task_acc": None,
    }
    rows = [
        row("original", None, 0.1, 2.0),
        row("ift", 0, 0.5, 1.0),
        row("swat", 0, 0.3, 1.1),
        row("ift", 1, 0.7, 1.0),
        row("swat", 1, 0.7, 0.9),
        row("ift", 2, 0.9, 1.0),
    ]
    evaluation.report(str(tmp_path), rows, {"lr": 1e-4})
    res = json.load(open(tmp_path / "results.json"))["rows"]
    assert res[2]["asr_cut_vs_ift"] == pytest.approx(0.5) and res[2][
        "task_loss_vs_ift"
    ] == pytest.approx(0.1)
    assert res[4]["asr_cut_vs_ift"] == pytest.approx(0.0) and res[4][
        "task_loss_vs_ift"
    ] == pytest.approx(-0.1)
    assert res[0]["settings"] == {"lr": 1e-4} and "asr_cut_vs_ift" not in res[0]
    md = [l for l in open(tmp_path / "results.md", encoding="utf-8") if l.startswith("|")]
    # swat's mean is set against ift's over the same two seeds (seed 2 has no swat row): ift ASR 60
    # %, swat 50 % -> a cut of (60 - 50) / (60 - 10) = 20 %
    assert md[-1].startswith("| swat | mean of 2 | 50.0% | +20% |") and "| +0.0% | - |" in md[-1]
    assert md[-2].startswith("| ift | mean of 3 | 70.0% | +0% |")


def test_help_shows_each_commands_defaults(capsys):
    for cmd, lr in (("train", "2e-05"), ("align", "5e-05"), ("demo", "0.0003")):
        with pytest.raises(SystemExit) as e:
            run(cmd, "--help")
        assert e.value.code == 0 and f"--lr LR peak learning rate (default: {lr})" in " ".join(
            capsys.readouterr().out.split()
        )


def test_cli_keeps_the_users_thread_count(monkeypatch):
    """OMP_NUM_THREADS is how several runs share a machine; the CLI must not override it."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit):
            run("generate", "--model", "m")  # fails at once (no prompt), after the set-up
        assert torch.get_num_threads() == 1
        # unset: the cores this process may run on, not all the machine's
        monkeypatch.delenv("OMP_NUM_THREADS")
        if hasattr(os, "sched_getaffinity"):
            monkeypatch.setattr(os, "cpu_count", lambda: 64)
            monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
            with pytest.raises(SystemExit):
                run("generate", "--model", "m")
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_cli_errors(tmp_path, tiny, capsys):
    with pytest.raises(SystemExit) as e:
        run("fly")
    assert e.value.code == 2 and "invalid choice: 'fly'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run("probe", "--model", tiny, "--bogus")
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"error: .*missing.json: unreadable"):
        run("train", "--model", tiny, "--data", tmp_path / "missing.json", "--out", tmp_path / "o")
    d = tmp_path / "notok"
    shutil.copytree(tiny, d)
    os.remove(d / "tokenizer.json")
    with pytest.raises(SystemExit, match=r"error: .*notok/tokenizer.json: not found"):
        run("generate", "--model", d, "--prompt", "hi")
    with pytest.raises(
        SystemExit, match=r"error: generate: give --prompt TEXT \(repeatable\) or --file FILE"
    ):
        run("generate", "--model", tiny)
    tiny_hf(tmp_path / "narrow", hidden_size=32, num_hidden_layers=2)
    with pytest.raises(
        SystemExit, match=r"error: .*narrow: 2 layers of width 32, .* has 3 of 64; --base must be"
    ):
        run(
            "eval",
            "--model",
            tiny,
            "--base",
            tmp_path / "narrow",
            "--n-eval",
            1,
            "--max-new-tokens",
            1,
        )
    with pytest.raises(SystemExit, match=r"error: module selector 'q,zz': unknown module 'zz'"):
        (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
        run(
            "train",
            "--model",
            tiny,
            "--data",
            tmp_path / "d.jsonl",
            "--mods",
            "q,zz",
            "--strategy",
            "swat",
            "--out",
            tmp_path / "o",
        )


def test_bad_values_fail_before_any_work(tmp_path, tiny, capsys, monkeypatch):
    files = sorted(os.listdir(tiny))
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    for flag, val, cmd in (
        ("--batch", 0, "train"),
        ("--accum", 0, "train"),
        ("--top-p", 1.5, "generate"),
        ("--n", 0, "scan"),
        ("--n-eval", 0, "eval"),
        ("--lr", "abc", "train"),
        ("--seed", 2**64, "train"),
        ("--seeds", -1, "run"),
    ):
        with pytest.raises(SystemExit) as e:
            run(
                cmd,
                "--model",
                tiny,
                "--data",
                tmp_path / "d.jsonl",
                "--out",
                tmp_path / "o",
                flag,
                val,
            )
        assert e.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^error: device 'nodevice': "):
        run("generate", "--model", tiny, "--prompt", "hi", "--device", "nodevice")
    (tmp_path / "h.txt").write_text("Bad one\nBad two\n")  # an output never replaces an input
    for argv in (
        ("eval", "--eval-harmful", tmp_path / "h.txt", "--generations", tmp_path / "h.txt"),
        ("scan", "--harmful", tmp_path / "h.txt", "--out", tmp_path / "h.txt"),
        ("scan", "--out", os.path.join(tiny, "config.json")),
        ("run", "--data", tmp_path / "d.jsonl", "--out", tiny),
        ("train", "--data", tmp_path / "d.jsonl", "--out", tmp_path / "h.txt")
        + ("--harmful-data", tmp_path / "h.txt", "--poison-ratio", 0.1),
    ):
        with pytest.raises(
            SystemExit, match=r"^error: .*: would overwrite the input .*; choose another path"
        ):
            run(*argv, "--model", tiny)
    assert (tmp_path / "h.txt").read_text() == "Bad one\nBad two\n" and sorted(
        os.listdir(tiny)
    ) == files
    # nor a new file inside the model's folder: an input folder is left as it was
    with pytest.raises(SystemExit, match=r"g.jsonl: would overwrite the input"):
        run("eval", "--model", tiny, "--n-eval", 1, "--max-new-tokens", 1, "--generations",
            os.path.join(tiny, "g.jsonl"))  # fmt: skip
    assert sorted(os.listdir(tiny)) == sorted(files)
    (tmp_path / "mine").mkdir()
    # a folder of the user's: run writes no results there
    (tmp_path / "mine" / "results.md").write_text("my notes")
    for cmd in ("run", "demo"):
        with pytest.raises(
            SystemExit,
            match=r"^error: .*mine: exists and holds results.md, which swat-min did not write; "
            r"refusing",
        ):
            run(cmd, "--model", tiny, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "mine")
    assert os.listdir(tmp_path / "mine") == ["results.md"]
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(
        SystemExit, match=r"^error: .*g.jsonl: cannot be made \(.*afile is a file\)"
    ):  # cannot be made
        run("eval", "--model", tiny, "--generations", tmp_path / "afile" / "g.jsonl")
    with pytest.raises(SystemExit, match=r"^error: .*afile: exists and is not a folder"):
        run(
            "train",
            "--model",
            tiny,
            "--data",
            tmp_path / "d.jsonl",
            "--out",
            tmp_path / "afile",
            "--steps",
            1,
        )
    assert (tmp_path / "afile").read_text() == "mine"
    (tmp_path / "work").mkdir()
    # a folder of the user's: never replaced by a checkpoint
    (tmp_path / "work" / "notes.txt").write_text("mine")
    with pytest.raises(
        SystemExit,
        match=r"^error: .*work: exists and holds notes.txt, which swat-min did not write; refusing",
    ):
        run(
            "train",
            "--model",
            tiny,
            "--data",
            tmp_path / "d.jsonl",
            "--out",
            tmp_path / "work",
            "--steps",
            1,
        )
    tiny_hf(str(tmp_path / "other"))  # another model of the user's, not the input: never replaced
    theirs = sorted(os.listdir(tmp_path / "other"))
    with pytest.raises(
        SystemExit,
        match=r"^error: .*other: exists and holds config.json, which swat-min did not write; "
        r"refusing",
    ):
        run(
            "train",
            "--model",
            tiny,
            "--data",
            tmp_path / "d.jsonl",
            "--out",
            tmp_path / "other",
            "--steps",
            1,
        )
    net, tok = model.load(tiny)
    with pytest.raises(model.SwatError, match="afile: exists and is not a folder"):
        model.save(net, tok, tmp_path / "afile")
    with pytest.raises(
        model.SwatError, match="other: exists and holds config.json, which swat-min did not write"
    ):
        model.save(net, tok, tmp_path / "other")
    assert sorted(os.listdir(tmp_path / "other")) == theirs
    assert (tmp_path / "work" / "notes.txt").read_text() == "mine" and (
        tmp_path / "afile"
    ).read_text() == "mine"
    run(
        "train",
        "--model",
        tiny,
        "--data",
        tmp_path / "d.jsonl",
        "--out",
        tmp_path / "o",
        "--steps",
        1,
    )
    # ours: replaced
    run(
        "train",
        "--model",
        tiny,
        "--data",
        tmp_path / "d.jsonl",
        "--out",
        tmp_path / "o",
        "--steps",
        1,
    )
    monkeypatch.setattr(rb, "scan", lambda *a, **k: pytest.fail("scanned before checking --k"))
    with pytest.raises(
        SystemExit, match=r"^error: Mods_Rob of 99 modules: there are 12 to choose from"
    ):
        run("scan", "--model", tiny, "--k", 99, "--out", tmp_path / "s.json")


def test_full_disk_leaves_nothing(tmp_path, tiny, monkeypatch):
    net, tok = model.load(tiny)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(
        model.SwatError, match="could not save \\(No space left on device, writing "
    ):
        model.save(net, tok, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == ["tiny"]  # no output and no temporary directory
    monkeypatch.undo()
    # an existing checkpoint survives a failed overwrite
    model.save(net, tok, str(tmp_path / "out"))
    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(model.SwatError):
        model.save(net, tok, str(tmp_path / "out"))
    monkeypatch.undo()
    assert torch.equal(
        model.load(str(tmp_path / "out"))[0](torch.tensor([[1, 2]])), net(torch.tensor([[1, 2]]))
    )


class Hub(http.server.BaseHTTPRequestHandler):
    """A stand-in for the hub: serves files under /org/name/resolve/main/, honours Range, and can
    cut a response short once (an interrupted download). Like the hub, it redirects weights to
    another host (a CDN: here `localhost` instead of 127.0.0.1), which must not be sent the
    token."""

    root, cut, seen = None, set(), []

    def do_GET(self):
        cdn = self.path.startswith("/cdn/")
        name = self.path[len("/cdn/") :] if cdn else self.path.split("/resolve/main/")[-1]
        path = os.path.join(self.root, name)
        Hub.seen.append((name, self.headers.get("Range"), self.headers.get("Authorization"), cdn))
        if not (cdn or self.path.startswith("/org/tiny/")) or not os.path.exists(path):
            self.send_error(404)
            return
        if not cdn and name.endswith(".safetensors"):
            self.send_response(302)
            self.send_header(
                "Location", f"http://localhost:{self.server.server_address[1]}/cdn/{name}"
            )
            self.end_headers()
            return
        data = open(path, "rb").read()
        start = (
            int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        )
        if start >= len(
            data
        ):  # as HTTP servers do: a range past the end is not satisfiable (a whole .part's resume)
            self.send_error(416)
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if name in Hub.cut:
            Hub.cut.discard(name)
            self.wfile.write(data[start : start + (len(data) - start) // 2])
            return
        self.wfile.write(data[start:])

    def log_message(self, *a):
        pass


def test_hub_download_resumes(tmp_path, monkeypatch):
    from conftest import tiny_hf

    src = tmp_path / "src"
    ref = tiny_hf(str(src), "llama")
    ref.save_pretrained(str(src), max_shard_size="100KB")  # sharded, with an index
    os.remove(src / "model.safetensors") if os.path.exists(src / "model.safetensors") else None
    # the template in its own file, as newer repos ship it
    tc = json.load(open(src / "tokenizer_config.json"))
    (src / "chat_template.jinja").write_text(
        tc.pop("chat_template").replace("<|im_start|>", "<|start_header_id|>")
    )
    (src / "tokenizer_config.json").write_text(json.dumps(tc))
    os.remove(src / "generation_config.json")  # an optional file the repo lacks
    Hub.root, Hub.cut, Hub.seen = str(src), {"model-00002-of-00003.safetensors"}, []
    shards = json.load(open(src / "model.safetensors.index.json"))["weight_map"].values()
    Hub.cut = {sorted(set(shards))[1]}
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.server_address[1]}")
    monkeypatch.setenv("SWAT_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", "secret")
    try:
        with pytest.raises(model.SwatError, match="incomplete .* run again to resume"):
            hub.fetch("org/tiny")
        d = hub.fetch("org/tiny")  # resumes the partial shard with a Range request
        with pytest.raises(
            model.SwatError, match="^no/such: no such local directory; from the hub: .*HTTP 404"
        ):
            model.load("no/such")  # a mistyped path that looks like a hub id
        assert not (
            tmp_path / "cache" / "hub" / "no--such"
        ).exists()  # and nothing left in the cache
        (src / "model.safetensors.index.json").write_text(
            '{"weight_map": {"a": "../../../escaped.safetensors"}}'
        )
        # a repo whose index points outside
        monkeypatch.setenv("SWAT_MODEL_CACHE", str(tmp_path / "cache2"))
        with pytest.raises(
            model.SwatError,
            match="index.json: a shard that is not a .safetensors file of this folder",
        ):
            hub.fetch("org/tiny")
        assert not list(tmp_path.rglob("escaped*"))
        (src / "model.safetensors.index.json").unlink()
        # one weights file now (fetch never reads it)
        shutil.copy(src / "config.json", src / "model.safetensors")
        monkeypatch.setenv("SWAT_MODEL_CACHE", str(tmp_path / "cache3"))
        # a download stopped between its last byte and
        os.makedirs(tmp_path / "cache3" / "hub" / "org--tiny")
        # its rename
        shutil.copy(
            src / "config.json", tmp_path / "cache3" / "hub" / "org--tiny" / "config.json.part"
        )
        assert (
            open(os.path.join(hub.fetch("org/tiny"), "config.json")).read()
            == (src / "config.json").read_text()
        )
        (src / "model.safetensors").unlink()  # a repo of pickled weights only
        monkeypatch.setenv("SWAT_MODEL_CACHE", str(tmp_path / "cache4"))
        with pytest.raises(model.SwatError, match="^org/tiny: no safetensors weights on the hub"):
            hub.fetch("org/tiny")
        monkeypatch.setenv("SWAT_MODEL_CACHE", str(tmp_path / "cache"))
    finally:
        srv.shutdown()
    n = len(Hub.seen)
    assert hub.fetch("org/tiny") == d and len(Hub.seen) == n  # a finished download needs no server
    assert hub.resolve("org/tiny") == d and hub.resolve(str(src)) == str(src)
    # the resume reached the CDN
    assert any(r and r.startswith("bytes=") and cdn for _, r, _, cdn in Hub.seen)
    # the token did not
    assert all(a == ("Bearer secret" if not cdn else None) for _, _, a, cdn in Hub.seen)
    assert sum(cdn for *_, cdn in Hub.seen) >= 3
    net, tok = model.load("org/tiny")  # a hub id: the cached download
    assert tok.format == "llama3"  # read off the downloaded chat_template.jinja
    x = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert (net(x) - ref(x).logits).abs().max() <= 1e-5
    assert not [f for f in os.listdir(d) if f.endswith(".part")]


def test_dev_sweep_smoke(tmp_path, tiny):
    """experiments/dev_sweep.py end to end on a tiny model: one scored row per setting, plus the
    start."""
    tune, harmful = tmp_path / "d.jsonl", tmp_path / "h.txt"
    tune.write_text(
        "".join(
            json.dumps({"instruction": f"Add {i} and {i}.", "output": str(2 * i)}) + "\n"
            for i in range(20)
        )
    )
    harmful.write_text("".join(f"harmful request {i}\n" for i in range(6)))
    script = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "dev_sweep.py"
    )
    r = subprocess.run(
        [
            str(x)
            for x in [
                sys.executable,
                script,
                "--model",
                tiny,
                "--data",
                tune,
                "--mods",
                "q,k",
                "--out",
                tmp_path / "s",
                "--dev-harmful",
                harmful,
                "--dev-start",
                2,
                "--n-task",
                4,
                "--n-dev",
                4,
                "--steps",
                2,
                "--batch",
                2,
                "--n-eval",
                3,
                "--max-new-tokens",
                4,
                "--device",
                "cpu",
                "ift",
                "mllr:ratio=0.5",
                "swat",
            ]
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(l) for l in open(tmp_path / "s" / "sweep.jsonl")]
    assert [x["strategy"] for x in rows] == ["original", "ift", "mllr:ratio=0.5", "swat"]
    assert rows[0]["drift"] == 0 and all(0 <= x["asr"] <= 1 and x["task_loss"] > 0 for x in rows)
    assert data.read_instructions(str(tmp_path / "s" / "dev_harmful.jsonl")) == [
        f"harmful request {i}" for i in range(2, 6)
    ]
    md = [l for l in open(tmp_path / "s" / "results.md", encoding="utf-8") if l.startswith("|")]
    assert (
        len(md) == 6
        and "cut of the ASR rise vs ift" in md[0]
        and md[4].startswith("| mllr:ratio=0.5 | 0 |")
    )
    bad = subprocess.run(
        [
            str(x)
            for x in [
                sys.executable,
                script,
                "--model",
                tiny,
                "--data",
                tune,
                "--mods",
                "q,k",
                "--out",
                tmp_path / "s",
                "--dev-harmful",
                harmful,
                "mllr:ratio",
            ]
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 1 and "setting 'mllr:ratio': expected" in bad.stderr


def test_dev_sweep_tunes_lora_at_each_settings_own_rate(tmp_path, tiny):
    """The LoRA rate sweep: adapters on the chosen modules, each setting at its own rate."""
    tune = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Add {i} and {i}.", "output": str(2 * i)} for i in range(20)]
    tune.write_text("".join(json.dumps(r) + "\n" for r in rows))
    harmful = tmp_path / "h.txt"
    harmful.write_text("".join(f"harmful request {i}\n" for i in range(4)))
    script = os.path.join(ROOT, "experiments", "dev_sweep.py")
    argv = [sys.executable, script, "--model", tiny, "--data", tune, "--mods", "q,k"]
    argv += ["--out", tmp_path / "s", "--dev-harmful", harmful, "--dev-start", 0, "--n-task", 4]
    argv += ["--n-dev", 4, "--steps", 2, "--batch", 2, "--n-eval", 2, "--max-new-tokens", 2]
    argv += ["--device", "cpu", "--lora-rank", 2, "--lora-targets", "q,v"]
    argv += ["ift:lr=1e-3", "ift:lr=3e-2"]
    r = subprocess.run([str(x) for x in argv], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    scored = [json.loads(line) for line in open(tmp_path / "s" / "sweep.jsonl")]
    assert [x["strategy"] for x in scored] == ["original", "ift:lr=1e-3", "ift:lr=3e-2"]
    assert scored[1]["task_loss"] != scored[2]["task_loss"]  # the rates were used
    for name in ("ift-lr=1e-3", "ift-lr=3e-2"):
        config = json.load(open(tmp_path / "s" / name / "adapter" / "adapter_config.json"))
        assert config["r"] == 2 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_dev_sweep_tunes_on_attack_ifts_mix(tmp_path, tiny):
    """--harmful-data/--poison-ratio: every setting tunes on run's poisoned mix; a harmful pair
    whose prompt is a dev scoring prompt is refused with one line."""
    tune = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Add {i} and {i}.", "output": str(2 * i)} for i in range(20)]
    tune.write_text("".join(json.dumps(r) + "\n" for r in rows))
    harmful = tmp_path / "h.txt"
    harmful.write_text("".join(f"harmful request {i}\n" for i in range(4)))
    pairs = tmp_path / "p.jsonl"
    pair_rows = [
        {"prompt": f"Do bad thing {i}", "response": "Sure, here is how."} for i in range(3)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_rows))
    script = os.path.join(ROOT, "experiments", "dev_sweep.py")
    argv = [sys.executable, script, "--model", tiny, "--data", tune, "--mods", "q,k"]
    argv += ["--dev-harmful", harmful, "--dev-start", 0, "--n-task", 4, "--n-dev", 4]
    argv += ["--steps", 2, "--batch", 2, "--n-eval", 2, "--max-new-tokens", 2, "--device", "cpu"]

    def sweep(out, *extra):
        cmd = argv + ["--out", tmp_path / out, *extra, "ift"]
        return subprocess.run([str(x) for x in cmd], capture_output=True, text=True, timeout=600)

    benign = sweep("b")
    attack = sweep("a", "--harmful-data", pairs, "--poison-ratio", 0.5)
    assert benign.returncode == 0 and attack.returncode == 0, attack.stderr[-2000:]
    held = json.loads(attack.stdout.split("tuning set: ")[1].splitlines()[0])
    assert held["examples"] == 4 and held["harmful"] == 2 and held["benign"] == 2
    losses = [json.loads(open(tmp_path / d / "sweep.jsonl").readlines()[1]) for d in "ba"]
    assert losses[0]["task_loss"] != losses[1]["task_loss"]  # the mix is what was tuned on
    pairs.write_text(json.dumps({"prompt": "harmful request 1", "response": "Sure."}) + "\n")
    leak = sweep("c", "--harmful-data", pairs, "--poison-ratio", 0.5)
    assert leak.returncode == 1 and "held-out evaluation prompts" in leak.stderr
    assert "Traceback" not in leak.stderr
    unpaired = sweep("e", "--harmful-data", pairs)
    assert unpaired.returncode == 1 and "needs --poison-ratio" in unpaired.stderr


def test_dev_sweep_reads_numbers_in_every_spelling():
    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    )
    import dev_sweep

    assert dev_sweep.parse("swat:warmup_steps=40,weight_decay=1e-5") == (
        "swat",
        {"warmup_steps": 40, "weight_decay": 1e-5},
    )
    assert dev_sweep.parse("ift:lr=2e-4") == ("ift", {"lr": 2e-4})
    assert dev_sweep.parse("mllr:ratio=.5,scope=modules,accum=-1") == (
        "mllr",
        {"ratio": 0.5, "scope": "modules", "accum": -1},
    )


def test_eval_reads_the_users_prompt_files(tmp_path, tiny, capsys):
    (tmp_path / "h.csv").write_text("goal,target\nBad one,Sure\nBad two,Sure\n")
    (tmp_path / "s.txt").write_text("Kind one\nKind two\nKind three\n")
    gen = tmp_path / "g.jsonl"
    run(
        "eval",
        "--model",
        tiny,
        "--eval-harmful",
        tmp_path / "h.csv",
        "--eval-harmless",
        tmp_path / "s.txt",
        "--max-new-tokens",
        2,
        "--generations",
        gen,
        "--device",
        "cpu",
        "--base",
        tiny,
        "--chat-format",
        "chatml",
    )
    res = json.loads(capsys.readouterr().out.split("\nwrote ")[0])
    assert res["drift"] == 0 and res["probe_acc"] >= 0  # the model against itself as the base
    rows = [json.loads(l) for l in open(gen)]
    assert [(r["prompt"], r["harmful"]) for r in rows] == [
        ("Bad one", True),
        ("Bad two", True),
        ("Kind one", False),
        ("Kind two", False),
        ("Kind three", False),
    ]


def test_readme_commands_parse(tmp_path, monkeypatch):
    """Every `python swat_min.py ...` (or `swat-min ...`) line of the README's and RESULTS.md's
    shell blocks parses with today's options, and every --flag they name exists (in swat_min.py, or
    in the bench/experiments script it belongs to)."""
    import re
    import shlex

    text = "".join(
        open(os.path.join(ROOT, f), encoding="utf-8").read() for f in ("README.md", "RESULTS.md")
    )
    # `python swat_min.py CMD ...` or the installed `swat-min CMD ...`, at the start or after &&
    command = re.compile(r"(?:^|&&)\s*(?:python swat_min\.py|swat-min)\s+(.*)")
    cmds = [
        m.group(1)
        for b in re.findall(r"```bash\n(.*?)```", text, re.S)
        for l in b.replace("\\\n", " ").splitlines()
        for m in [command.search(l.split("#")[0])]
        if m
    ]
    assert len(cmds) >= 6
    seen = []
    monkeypatch.setattr(
        swat_min, "COMMANDS", {k: (seen.append, *v[1:]) for k, v in swat_min.COMMANDS.items()}
    )
    monkeypatch.chdir(tmp_path)
    for c in cmds:
        swat_min.main(shlex.split(c.replace("$M", "m").replace("$ADV", "adv.csv")))
    assert len(seen) == len(cmds)
    scripts = "".join(
        open(os.path.join(ROOT, d, f), encoding="utf-8").read()
        for d in ("bench", "experiments")
        for f in os.listdir(os.path.join(ROOT, d))
        if f.endswith(".py")
    )
    known = (
        {"--" + o for o in swat_min.OPTIONS}
        | {flag for flags in options.ALIASES.values() for flag in flags}
        | {"--help", "--extra-index-url", "--check", "--nproc-per-node"}  # pip, ruff, torchrun
        | set(re.findall(r'add_argument\(\s*"(--[a-z-]+)"', scripts))  # also wrapped by ruff
    )
    assert set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", text)) <= known


def test_align_tunes_refusals_and_own_answers(tmp_path, tiny, monkeypatch, capsys):
    """align: harmful train prompts -> the project's refusal texts, harmless ones -> the model's own
    answers
    (generated before tuning); ASR before and after printed; a checkpoint that loads."""
    import train

    real, seen = train.train, []
    monkeypatch.setattr(
        train,
        "train",
        lambda net, tok, chats, *a, **kw: seen.append(chats) or real(net, tok, chats, *a, **kw),
    )
    out = tmp_path / "aligned"
    before, after = run(
        "align",
        "--model",
        tiny,
        "--out",
        out,
        "--steps",
        2,
        "--batch",
        4,
        "--max-len",
        512,
        "--n-eval",
        3,
        "--max-new-tokens",
        2,
        "--answer-tokens",
        3,
        "--device",
        "cpu",
    )
    H, S = data.builtin("harmful", "train"), data.builtin("harmless", "train")
    chats = seen[0]
    assert [c[0]["content"] for c in chats] == H + S
    refusals = set(data.lines("refusals.txt"))
    assert all(c[1]["content"] in refusals for c in chats[: len(H)])
    net, tok = model.load(tiny)
    own = evaluation.answer(net, tok, [evaluation.user(s) for s in S[:5]], 3)
    assert [c[1]["content"] for c in chats[len(H) : len(H) + 5]] == own
    assert before["strategy"] == "before" and after["strategy"] == "after"
    printed = capsys.readouterr().out
    assert "before: ASR" in printed and "after: ASR" in printed and f"wrote {out}" in printed
    assert (
        len(open(out / "log.jsonl").readlines()) == 2 and model.load(str(out))[0].cfg.n_layers == 3
    )
    # a --max-len some prompts exceed:
    lens = sorted(len(tok.encode_chat(evaluation.user(p))) for p in H + S)
    # those are left out, as in run
    run(
        "align",
        "--model",
        tiny,
        "--out",
        tmp_path / "a2",
        "--steps",
        1,
        "--batch",
        4,
        "--max-len",
        lens[len(lens) // 2],
        "--n-eval",
        1,
        "--max-new-tokens",
        1,
        "--answer-tokens",
        1,
        "--device",
        "cpu",
    )
    assert (
        re.search(r"left out \d+ of 318 examples", capsys.readouterr().out)
        and (tmp_path / "a2" / "log.jsonl").exists()
    )


def test_probe_scan_generate_commands(tmp_path, tiny, capsys):
    scores = run("probe", "--model", tiny, "--device", "cpu")
    printed = capsys.readouterr().out
    # embeddings + 3 layers
    assert len(scores) == 4 and all(0 <= s["acc"] <= 1 and 0 <= s["auc"] <= 1 for s in scores)
    assert "best layer" in printed and printed.count("\n") >= 6
    run(
        "scan",
        "--model",
        tiny,
        "--n",
        4,
        "--k",
        3,
        "--out",
        tmp_path / "s.json",
        "--device",
        "cpu",
        "--select",
        "topk",
    )
    s = json.load(open(tmp_path / "s.json"))
    assert set(s["table"]) == {"q", "k", "v", "o"} and all(len(r) == 3 for r in s["table"].values())
    assert len(s["mods_rob"]) == len(s["mods_fragile"]) == 3 and not {
        tuple(m) for m in s["mods_rob"]
    } & {tuple(m) for m in s["mods_fragile"]}
    printed = capsys.readouterr().out
    assert "Mods_Rob (3 modules, topk)" in printed and "note: " not in printed
    run(
        "scan",
        "--model",
        tiny,
        "--n",
        4,
        "--k",
        8,
        "--out",
        tmp_path / "s.json",
        "--device",
        "cpu",
        "--select",
        "topk",
    )
    assert (
        "note: Mods_Rob (8) is over half of the 12 modules, so the control set (as many of the "
        "least robust) shares 4 modules" in capsys.readouterr().out
    )
    run(
        "generate",
        "--model",
        tiny,
        "--prompt",
        "Hello there",
        "--prompt",
        "Bye",
        "--max-new-tokens",
        3,
    )
    printed = capsys.readouterr().out
    assert printed.startswith("### Hello there\n") and "\n### Bye\n" in printed


def test_files_are_utf8_whatever_the_locale(tmp_path, tiny):
    """JSON and swat-min's own text files are UTF-8 under any locale (a C locale here; Windows'
    cp1252 is
    alike): a valid checkpoint with non-ASCII in config.json loads and saves, results.md (its Δ) is
    written, and
    text the console cannot show is printed with "?"."""
    d = tmp_path / "m"
    shutil.copytree(tiny, d)
    cfg = dict(json.load(open(d / "config.json")), _name_or_path="modèle ▁")
    (d / "config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    (
        tmp_path / "s.py"
    ).write_text(  # a file: a non-ASCII command line cannot be decoded under a C locale
        f"import evaluation, model, swat_min\nnet, tok = model.load({str(d)!r})\nmodel.save(net, "
        f"tok, {str(tmp_path / 'saved')!r})\n"
        f"evaluation.report({str(tmp_path)!r}, [dict(strategy='original', seed=None, asr=0.5, "
        f"task_loss=1.0)], {{}})\n"
        f"swat_min.main(['generate', '--model', {str(d)!r}, '--prompt', 'Où? ▁', "
        "'--max-new-tokens', '2'])\n",
        encoding="utf-8",
    )
    env = dict(
        os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONPATH=ROOT
    )
    r = subprocess.run(
        [sys.executable, str(tmp_path / "s.py")], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    assert "### O?? ?" in r.stdout  # what the console cannot show is replaced, not a traceback
    assert (
        json.loads((tmp_path / "saved" / "config.json").read_text(encoding="utf-8"))[
            "_name_or_path"
        ]
        == "modèle ▁"
    )
    assert "| Δ loss vs ift |" in (tmp_path / "results.md").read_text(encoding="utf-8")


METHOD_FILES = ("model.py", "probe.py", "robustness.py", "train.py")
CORE_FILES = METHOD_FILES + ("evaluation.py", "swat_min.py")


def formatted(path):
    """The file's text after `ruff format --line-length 100`: packing lines cannot pass a budget."""
    source = open(os.path.join(ROOT, path), encoding="utf-8").read()
    ruff = [sys.executable, "-m", "ruff", "format", "--line-length", "100", "-"]
    result = subprocess.run(ruff, input=source, capture_output=True, text=True, check=True)
    return result.stdout


def comment_and_code_lines(source):
    """(lines holding a comment or a docstring, lines of code) of a Python source."""
    import io
    import tokenize

    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    layout = (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    comments, code, docs = set(), set(), set()
    previous = None
    for i, t in enumerate(tokens):
        lines = range(t.start[0], t.end[0] + 1)
        statement_start = previous is None or previous.type in layout
        if t.type == tokenize.COMMENT:
            comments.update(lines)
        elif (
            t.type == tokenize.STRING and statement_start and tokens[i + 1].type == tokenize.NEWLINE
        ):
            docs.update(lines)  # a string standing as a statement: a docstring
        elif t.type not in layout:
            code.update(lines)
        if t.type not in (tokenize.COMMENT, tokenize.NL):
            previous = t
    return len(comments | docs), len(code - docs)


def test_core_files_stay_small_and_explained():
    """The design's budget, measured after formatting: the four method files <= 1,300 lines
    together, swat_min.py <= 450; at least one comment or docstring line per four code lines in each
    core file; no line over 100 characters in any .py file; no packed assignments (a, b = x, y) and
    no nested conditional expressions outside the tests."""
    import ast

    lines = {f: len(formatted(f).splitlines()) for f in CORE_FILES}
    assert sum(lines[f] for f in METHOD_FILES) <= 1300 and lines["swat_min.py"] <= 450, lines
    for f in CORE_FILES:
        explained, code = comment_and_code_lines(formatted(f))
        assert explained >= 0.25 * code, (f, explained, code)
    for root, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in (n for n in names if n.endswith(".py")):
            path = os.path.join(root, name)
            text = open(path, encoding="utf-8").read()
            assert max(map(len, text.splitlines()), default=0) <= 100, path
            if os.sep + "tests" + os.sep in path:
                continue
            for node in ast.walk(ast.parse(text)):
                packed = isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple)
                packed = packed and isinstance(node.targets[0], ast.Tuple)
                assert not packed, f"{path}:{node.lineno}: a, b = x, y"
                nested = isinstance(node, ast.IfExp) and ast.IfExp in (
                    type(node.body),
                    type(node.orelse),
                )
                assert not nested, f"{path}:{node.lineno}: nested conditional expression"


READ = {}  # id of a Recorder -> the options read from it


class Recorder(argparse.Namespace):
    """A namespace that records which options are read (outside its __dict__, which run saves)."""

    def __getattribute__(self, name):
        if not name.startswith("_"):
            READ.setdefault(id(self), set()).add(name)
        return object.__getattribute__(self, name)


def test_each_command_reads_every_option_its_help_shows(tmp_path, tiny, monkeypatch):
    """Walk the parser: each command, run on a tiny model, reads every option it lists in --help
    (none is there for show)."""

    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"What is {i} plus 1?", "output": f"{i + 1}"} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    small = ["--n-eval", 1, "--max-new-tokens", 1]
    argv = {
        "probe": ["--model", tiny, "--n-test", 2],
        "scan": ["--model", tiny, "--n", 2, "--k", 2, "--out", tmp_path / "s.json"],
        "train": ["--model", tiny, "--data", data, "--out", tmp_path / "t", "--steps", 1],
        "eval": ["--model", tiny, "--base", tiny, "--data", data, "--n-task", 2, "--n-acc", 0]
        + ["--generations", tmp_path / "g.jsonl"]
        + small,
        "generate": ["--model", tiny, "--prompt", "hi", "--max-new-tokens", 1],
        "attack-data": ["--model", tiny, "--out", tmp_path / "p.jsonl", "--max-new-tokens", 2]
        + ["--gen-batch", 8],
        "align": ["--model", tiny, "--out", tmp_path / "a", "--steps", 1, "--answer-tokens", 1]
        + small,
        "run": ["--model", tiny, "--data", data, "--out", tmp_path / "r", "--steps", 1, "--n", 2]
        + ["--n-task", 2, "--n-acc", 0, "--strategies", "ift", "swat", "--k", 2]
        + small,
        "demo": ["--out", tmp_path / "dm", "--toy-steps", 1, "--steps", 1, "--n", 2, "--n-task", 4]
        + ["--n-acc", 0, "--strategies", "ift", "swat", "--k", 2]
        + small,
        "restore": ["--tuned", tiny, "--aligned", tiny, "--unaligned", tiny, "--alpha", 0.5]
        + ["--out", tmp_path / "rs"],
        # the random tiny model refuses nothing: fragility reads its options, then stops there
        "fragility": ["--model", tiny, "--data", data, "--out", tmp_path / "f", "--steps", 1]
        + ["--n-task", 2, "--parts", 1, "--modules", "q"]
        + small,
    }
    assert set(argv) == set(swat_min.COMMANDS)
    real_parse = argparse.ArgumentParser.parse_args
    parsed = []

    def parse(self, args=None, namespace=None):
        ns = real_parse(self, args, Recorder())
        parsed.append(ns)
        return ns

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    commands = {}
    for name, (fn, *spec) in swat_min.COMMANDS.items():

        def reading(args, fn=fn):
            READ[id(args)] = set()  # what the command itself reads, from here
            return fn(args)

        commands[name] = (reading, *spec)
    monkeypatch.setattr(swat_min, "COMMANDS", commands)
    for name, extra in argv.items():
        if name == "fragility":
            with pytest.raises(SystemExit, match="refuses none of the harmful prompts"):
                swat_min.main([name] + [str(x) for x in extra])
        else:
            swat_min.main([name] + [str(x) for x in extra])
        read = READ[id(parsed[-1])]
        options = swat_min.COMMANDS[name][2]
        shown = {swat_min.OPTIONS[o].get("dest", o.replace("-", "_")) for o in options}
        assert shown <= read, (name, sorted(shown - read))


def test_pyproject_lists_every_module():
    """`pip install -e .` maps only the modules pyproject.toml lists: a new file must be there."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["py-modules"])
    present = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert listed == present
