"""A user's data is never lost and a run never succeeds with garbage: output ownership, interrupted
saves, NaN guards, honest resume, faults and misuse as one line."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import SafetensorError

from swatkit import checkpoint, runlog
import evaluation
import model
import probe
import robustness as rb
import swat_min
from swatkit import tokenizer
import train
from conftest import ROOT, make_tokenizer, tiny_hf
from swatkit.files import SwatError

MARK = "swat-min.json"  # the manifest of a folder swat-min wrote

CHATS = [
    [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a + b}"},
    ]
    for a in range(6)
    for b in range(4)
]
SMALL = dict(lr=1e-3, batch_size=4)


def cli(*argv):
    return swat_min.main([str(a) for a in argv])


def write_data(path):
    rows = [{"instruction": f"What is {i} plus 1?", "output": f"{i + 1}"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def snapshot(folder):
    """Every file under folder with its bytes: to see that nothing was touched."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


# ---- 1-4: data loss ----


def test_never_deletes_an_input_named_like_a_temporary_sibling(tmp_path, tiny):
    """item 1: `train --model ckB.old --out ckB` deleted its own input."""
    shutil.copytree(tiny, tmp_path / "ckB.old")
    (tmp_path / "ckB.tmp").mkdir()
    (tmp_path / "ckB.tmp" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path / "ckB.old")
    data = write_data(tmp_path / "d.jsonl")
    for _ in range(2):  # the second replaces the first checkpoint
        cli(
            "train",
            "--model",
            tmp_path / "ckB.old",
            "--data",
            data,
            "--out",
            tmp_path / "ckB",
            "--steps",
            1,
        )
    assert snapshot(tmp_path / "ckB.old") == before
    assert (tmp_path / "ckB.tmp" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["ckB", "ckB.old", "ckB.tmp", "d.jsonl", "tiny"]
    # today's temporary names: a whole checkpoint of swat-min's as the input, a backup beside it
    for name in (".ckC.swat-old-1", ".ckC.swat-old-bak", ".ckC.swat-new-2"):
        shutil.copytree(tmp_path / "ckB", tmp_path / name)
    before = {name: snapshot(tmp_path / name) for name in os.listdir(tmp_path) if "ckC" in name}
    for _ in range(2):
        cli("train", "--model", tmp_path / ".ckC.swat-old-1", "--data", data, "--out",
            tmp_path / "ckC", "--steps", 1)  # fmt: skip
    assert {name: snapshot(tmp_path / name) for name in before} == before
    assert sorted(n for n in os.listdir(tmp_path) if "ckC" in n) == sorted([*before, "ckC"])


def test_never_deletes_a_users_file_in_a_folder_holding_a_log(tmp_path, tiny):
    """item 2: a folder with any log.jsonl (or swat-min.json) counted as swat-min's and was
    replaced."""
    data = write_data(tmp_path / "d.jsonl")
    exp = tmp_path / "myexp"
    exp.mkdir()
    (exp / "log.jsonl").write_text("{}\n")
    (exp / "thesis.tex").write_text("x")
    with pytest.raises(
        SystemExit, match=r"myexp: exists and holds log.jsonl, which swat-min did not"
    ):
        cli("train", "--model", tiny, "--data", data, "--out", exp, "--steps", 1)
    # a manifest that does not list thesis.tex does not make it swat-min's either
    (exp / MARK).write_text(json.dumps({"written_by": "swat-min", "files": ["log.jsonl"]}))
    with pytest.raises(
        SystemExit, match=r"myexp: exists and holds thesis.tex, which swat-min did not"
    ):
        cli("train", "--model", tiny, "--data", data, "--out", exp, "--steps", 1)
    assert (exp / "thesis.tex").read_text() == "x"
    # a checkpoint swat-min wrote is replaced; a file added to it later makes it the user's
    cli("train", "--model", tiny, "--data", data, "--out", tmp_path / "ck", "--steps", 1)
    cli("train", "--model", tiny, "--data", data, "--out", tmp_path / "ck", "--steps", 1)
    (tmp_path / "ck" / "notes.md").write_text("mine")
    with pytest.raises(SystemExit, match=r"ck: exists and holds notes.md, which swat-min did not"):
        cli("train", "--model", tiny, "--data", data, "--out", tmp_path / "ck", "--steps", 1)
    assert (tmp_path / "ck" / "notes.md").read_text() == "mine"


def test_never_replaces_a_users_scan_generations_or_results(tmp_path, tiny, monkeypatch):
    """item 3: scan --out, eval --generations and run --out overwrote the user's files."""
    data = write_data(tmp_path / "d.jsonl")
    (tmp_path / "s.json").write_text('{"my": "table"}')
    (tmp_path / "g.jsonl").write_text('{"prompt": "mine"}\n')
    monkeypatch.setattr(rb, "scan", lambda *a, **k: pytest.fail("scanned before checking --out"))
    with pytest.raises(SystemExit, match=r"s.json: exists and swat-min did not write it; refusing"):
        cli("scan", "--model", tiny, "--n", 4, "--out", tmp_path / "s.json")
    with pytest.raises(
        SystemExit, match=r"g.jsonl: exists and swat-min did not write it; refusing"
    ):
        cli("eval", "--model", tiny, "--n-eval", 1, "--generations", tmp_path / "g.jsonl")
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "scan.json").write_text("{}")
    (exp / "results.md").write_text("my notes")
    with pytest.raises(
        SystemExit, match=r"exp: exists and holds results.md, which swat-min did not"
    ):
        cli("run", "--model", tiny, "--data", data, "--out", exp, "--steps", 1)
    assert (tmp_path / "s.json").read_text() == '{"my": "table"}'
    assert (tmp_path / "g.jsonl").read_text() == '{"prompt": "mine"}\n'
    assert snapshot(exp) == {"scan.json": b"{}", "results.md": b"my notes"}
    # swat-min's own outputs are replaced: its scan and its generations
    monkeypatch.undo()
    for _ in range(2):
        cli("scan", "--model", tiny, "--n", 4, "--k", 2, "--out", tmp_path / "s2.json")
        cli(
            "eval",
            "--model",
            tiny,
            "--n-eval",
            1,
            "--max-new-tokens",
            1,
            "--generations",
            tmp_path / "g2.jsonl",
        )
    assert json.loads((tmp_path / "s2.json").read_text())["written_by"] == "swat-min"
    # looking like swat-min's is no proof: a user's file of swat-min's own format stays
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"prompt": "p", "harmful": True, "response": "r", "refused": False}) + "\n"
    )
    (tmp_path / "s3.json").write_text('{"written_by": "swat-min", "mods_rob": []}')
    (tmp_path / "s4.svg").write_text("<svg><!-- written by swat-min --></svg>")
    kept = snapshot(tmp_path)
    with pytest.raises(SystemExit, match=r"p.jsonl: exists and swat-min did not write it"):
        cli("attack-data", "--model", tiny, "--out", tmp_path / "p.jsonl")
    for name in ("s3.json", "s4.svg"):  # the scan's JSON, or the picture beside it
        with pytest.raises(SystemExit, match=rf"{name}: exists and swat-min did not write it"):
            out = tmp_path / (name[:2] + ".json")
            cli("scan", "--model", tiny, "--n", 4, "--k", 2, "--out", out)
    # and a file swat-min wrote becomes the user's once changed
    with open(tmp_path / "s2.json", "a") as f:
        f.write("\n")
    with pytest.raises(SystemExit, match=r"s2.json: exists and swat-min did not write it"):
        cli("scan", "--model", tiny, "--n", 4, "--k", 2, "--out", tmp_path / "s2.json")
    with open(tmp_path / "s2.json", "a") as f:
        f.write("mine")
    assert snapshot(tmp_path) == dict(kept, **{"s2.json": (tmp_path / "s2.json").read_bytes()})


class Killed(BaseException):
    """A stand-in for SIGKILL: no except clause of the code under test catches it."""


# where save() can be interrupted: while writing, after the new checkpoint is whole but before the
# swap, between the swap's two renames, after them before the old one is removed, and halfway
# through that
FAULTS = ["writing", "manifest written", "old moved aside", "new moved in", "removing the old"]


@pytest.mark.parametrize("fault", FAULTS)
def test_save_interrupted_at_every_step_resumes_from_the_newest_whole_checkpoint(
    tmp_path, tiny, monkeypatch, fault
):
    """item 4: a kill between the swap's renames left out.old + out.tmp, and --resume deleted
    both."""
    kw = dict(steps=4, save_every=2, **SMALL)
    net, tok = model.load(tiny)
    train.train(net, tok, CHATS, str(tmp_path / "ref"), **kw)
    reference = net.state_dict()
    # the user's own files beside the output, named like swat-min's temporaries of old
    for name in ("o.old", "o.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine")
    # and named like today's: a backup copy of a whole checkpoint, a folder of the user's own
    shutil.copytree(tmp_path / "ref", tmp_path / ".o.swat-old-bak")
    (tmp_path / ".o.swat-new-mine").mkdir()
    (tmp_path / ".o.swat-new-mine" / "model.safetensors").write_text("mine")
    theirs = ("o.old", "o.tmp", ".o.swat-old-bak", ".o.swat-new-mine")
    users = {name: snapshot(tmp_path / name) for name in theirs}

    state = {"saves": 0, "dead": False}
    real = {"save_file": checkpoint.save_file, "replace": os.replace, "rmtree": shutil.rmtree}

    def die_if(cond):
        if state["dead"] or (state["saves"] == 2 and cond):
            state["dead"] = True
            raise Killed()

    def save_file(obj, path, *a, **k):
        real["save_file"](obj, path, *a, **k)
        die_if(fault == "writing" and path.endswith("model.safetensors"))

    def replace(src, dst):
        die_if(fault == "old moved aside" and ".swat-new-" in os.fspath(src))
        real["replace"](src, dst)
        die_if(fault == "new moved in" and ".swat-new-" in os.fspath(src))

    def rmtree(path, *a, **k):
        if state["saves"] == 2 and fault == "removing the old" and ".swat-old-" in os.fspath(path):
            os.remove(os.path.join(path, "model.safetensors"))  # half removed
            die_if(True)
        die_if(False)  # a dead process removes nothing (its clean-up on the way out included)
        real["rmtree"](path, *a, **k)

    real_write_json = checkpoint.write_json

    def write_json(path, obj):
        real_write_json(path, obj)
        die_if(fault == "manifest written" and path.endswith(MARK))

    real_save = checkpoint.save

    def counting_save(*a, **k):
        state["saves"] += 1
        return real_save(*a, **k)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    monkeypatch.setattr(checkpoint, "write_json", write_json)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(checkpoint, "save", counting_save)
    net, tok = model.load(tiny)
    with pytest.raises(Killed):
        train.train(net, tok, CHATS, str(tmp_path / "o"), **kw)
    monkeypatch.undo()

    resumed_from = []
    real_load = runlog.load_trainer  # the trainer's bookkeeping (swatkit.runlog) resumes

    def recording_load(*a):
        resumed_from.append(real_load(*a))
        return resumed_from[-1]

    monkeypatch.setattr(runlog, "load_trainer", recording_load)
    net, tok = model.load(tiny)
    train.train(net, tok, CHATS, str(tmp_path / "o"), resume=True, **kw)
    newest_whole = 2 if fault == "writing" else 4
    assert resumed_from == [newest_whole]
    for name, value in net.state_dict().items():
        assert torch.equal(value, reference[name]), name
    # nothing left over
    assert sorted(os.listdir(tmp_path)) == sorted(["notes.txt", "o", "ref", "tiny", *theirs])
    assert {name: snapshot(tmp_path / name) for name in theirs} == users
    assert json.load(open(tmp_path / "o" / "trainer.json"))["step"] == 4


# ---- 5-8: silent wrong results ----


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--ratio", "nan"),
        ("--weight-decay", "-inf"),
        ("--warmup-frac", "nan"),
    ],
)
def test_nan_and_inf_options_are_refused(tmp_path, tiny, capsys, flag, value):
    """item 5: --lr nan passed the range check and made an all-NaN checkpoint."""
    data = write_data(tmp_path / "d.jsonl")
    with pytest.raises(SystemExit) as e:
        cli("train", "--model", tiny, "--data", data, "--out", tmp_path / "o", flag, value)
    assert e.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli("generate", "--model", tiny, "--prompt", "hi", "--temperature", "nan")
    assert e.value.code == 2 and not os.path.exists(tmp_path / "o")


def test_nonfinite_gradient_stops_before_the_update_and_nothing_nonfinite_is_saved(tiny, tmp_path):
    """item 6: only the loss was checked, after a checkpoint could hold NaN weights."""
    net, tok = model.load(tiny)
    calls = []

    def poison(
        grad,
    ):  # the gradient (not the loss) turns infinite at step 3, after the checkpoint of step 2
        calls.append(1)
        return grad * math.inf if len(calls) == 3 else grad

    net.model.layers[0].self_attn.q_proj.weight.register_hook(poison)
    with pytest.raises(
        SwatError, match=r"non-finite loss or gradient at step 3;.* keeps the checkpoint of step 2"
    ):
        train.train(net, tok, CHATS, str(tmp_path / "o"), steps=4, save_every=2, **SMALL)
    assert all(v.isfinite().all() for v in net.state_dict().values())  # the update never ran
    net.model.norm.weight.data[0] = math.nan
    with pytest.raises(
        SwatError, match=r"not saved: non-finite weights \(model.norm.weight, 1 tensors"
    ):
        model.save(net, tok, str(tmp_path / "o"))
    assert json.load(open(tmp_path / "o" / "trainer.json"))["step"] == 2


def test_resume_refuses_a_checkpoint_of_another_model_of_the_same_shapes(tiny, tmp_path):
    """item 7: the result was the old model's run labelled with the new model's path."""
    net, tok = model.load(tiny)
    with torch.no_grad():
        net.model.layers[1].mlp.up_proj.weight.mul_(1.01)
    model.save(net, tok, str(tmp_path / "other"))
    net, tok = model.load(tiny)
    train.train(net, tok, CHATS, str(tmp_path / "o"), steps=4, save_every=2, **SMALL)
    net, tok = model.load(str(tmp_path / "other"))
    with pytest.raises(SwatError, match=r"o: its checkpoint was trained with another .*model"):
        train.train(
            net, tok, CHATS, str(tmp_path / "o"), steps=4, save_every=2, resume=True, **SMALL
        )


def test_a_list_input_is_refused_and_nan_weights_warn_at_load(tiny, tmp_path, capsys):
    """item 8: Alpaca's "input": ["a", "b"] was trained on as "['a', 'b']"; NaN weights said
    nothing."""
    from swatkit import data

    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "Add", "input": ["a", "b"], "output": "ab"}]))
    with pytest.raises(SwatError, match=r"d.json: record 1: 'input' must be text, not list"):
        data.read_examples(str(path))
    net, tok = model.load(tiny)
    net.model.layers[0].mlp.down_proj.weight.data[0, 0] = math.nan
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    shutil.copytree(tiny, tmp_path / "nan")
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "nan" / "model.safetensors"))
    capsys.readouterr()
    model.load(str(tmp_path / "nan"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 weight tensors hold NaN or inf" in err


# ---- 9-15: faults as one line, nothing half-written ----


def test_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(
    tiny, tmp_path, monkeypatch
):
    """item 9: safetensors' own error for a full disk is not an OSError: it was a traceback."""
    net, tok = model.load(tiny)
    model.save(net, tok, str(tmp_path / "out"))
    before = snapshot(tmp_path / "out")
    real = checkpoint.save_file

    def full(obj, path, *a, **k):  # half a file, then the disk is full
        real(obj, path, *a, **k)
        with open(path, "r+b") as f:
            f.truncate(100)
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with torch.no_grad():
        net.model.norm.weight.add_(1)
    with pytest.raises(
        SwatError,
        match=r"out: could not save \(Error while serializing: No space left.*"
        r"writing .*\.out\.swat-new-",
    ):
        model.save(net, tok, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["out", "tiny"] and snapshot(tmp_path / "out") == before


def test_resume_of_a_damaged_checkpoint_is_one_line(tiny, tmp_path, capsys):
    """item 10: a truncated log line, a truncated safetensors file, a trainer.json without step."""
    kw = dict(steps=4, save_every=2, **SMALL)
    out = tmp_path / "o"
    real_loss = train.loss_fn
    calls = []

    def killed_at_step_3(*a):
        calls.append(1)
        if len(calls) == 3:
            raise Killed()
        return real_loss(*a)

    train.loss_fn = killed_at_step_3
    net, tok = model.load(tiny)
    try:
        with pytest.raises(Killed):
            train.train(net, tok, CHATS, str(out), **kw)
    finally:
        train.loss_fn = real_loss
    shutil.copytree(out, tmp_path / "whole")
    # a log whose last line a kill cut short: that step comes after the checkpoint and is done again
    log = out / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "lo')
    capsys.readouterr()
    net, tok = model.load(tiny)
    rows = train.train(net, tok, CHATS, str(out), resume=True, **kw)
    assert "left out its damaged last line" in capsys.readouterr().out and len(rows) == 4
    damages = {
        "trainer.safetensors": lambda p: p.write_bytes(p.read_bytes()[:200]),
        "model.safetensors": lambda p: p.write_bytes(p.read_bytes()[:-100]),
        "trainer.json": lambda p: p.write_text(
            json.dumps({k: v for k, v in json.load(open(p)).items() if k != "step"})
        ),
    }
    for name, damage in damages.items():
        shutil.rmtree(out)
        shutil.copytree(tmp_path / "whole", out)
        damage(out / name)
        net, tok = model.load(tiny)
        with pytest.raises(
            SwatError, match=r"o: its checkpoint is damaged \(.*\); it cannot be resumed"
        ):
            train.train(net, tok, CHATS, str(out), resume=True, **kw)
    out_log = tmp_path / "whole" / "log.jsonl"
    out_log.write_text('{"step": 1, "lo\n' + out_log.read_text())
    with pytest.raises(
        SwatError, match=r"log.jsonl: line 1 is damaged; resume needs the log whole"
    ):
        runlog.read_log(str(out_log), 4)


def test_bad_rope_scaling_and_a_vocabulary_past_vocab_size_are_one_line(tmp_path):
    """item 11: rope_scaling as a string, a tokenizer larger than the embedding."""
    d = str(tmp_path / "m")
    tiny_hf(d)
    config = json.load(open(os.path.join(d, "config.json")))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(dict(config, rope_scaling="linear"), f)
    with pytest.raises(
        SwatError, match=r"config.json: rope_scaling must be an object of rope settings"
    ):
        model.load(d)
    tiny_hf(d, vocab_size=300)  # its tokenizer has 400 tokens
    with pytest.raises(
        SwatError, match=r"m: tokenizer.json has 400 tokens, more than the model's vocab_size 300"
    ):
        model.load(d)


def test_ctrl_c_is_one_line_and_exit_130(tiny, tmp_path):
    """item 12: Ctrl-C printed a traceback."""
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "o"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "swat_min.py"),
        "train",
        "--model",
        tiny,
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "100000",
        "--batch",
        "2",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        # Ctrl-C's default action, even where the test runs with SIGINT ignored (a background job)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while (
        not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text()
    ):  # training has begun
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert (
        "Traceback" not in err
        and err.strip().splitlines()[-1] == f"interrupted; results so far in {out}"
    )


def test_unwritable_outputs_fail_before_the_work_and_run_leaves_no_folder(
    tiny, tmp_path, monkeypatch
):
    """item 13: scan failed after the whole scan, train after step 1; run left an empty folder."""
    data = write_data(tmp_path / "d.jsonl")
    if not os.path.isdir("/sys"):
        pytest.skip("needs a read-only /sys (Linux)")
    monkeypatch.setattr(rb, "scan", lambda *a, **k: pytest.fail("scanned before checking --out"))
    monkeypatch.setattr(train, "loss_fn", lambda *a: pytest.fail("trained before checking --out"))
    with pytest.raises(SystemExit, match=r"^error: /sys/swat-scan.json: cannot write in /sys"):
        cli("scan", "--model", tiny, "--out", "/sys/swat-scan.json")
    with pytest.raises(SystemExit, match=r"^error: /sys/swat-out/x: cannot write in /sys"):
        cli("train", "--model", tiny, "--data", data, "--out", "/sys/swat-out/x", "--steps", 1)
    with pytest.raises(SystemExit, match=r"^error: /sys/x: cannot write in /sys"):
        cli("run", "--model", tiny, "--data", data, "--out", "/sys/x")
    # an error in the input, found after the output was checked: no folder is left behind
    with pytest.raises(SystemExit, match=r"error: .*nothere.jsonl: unreadable"):
        cli(
            "run",
            "--model",
            tiny,
            "--data",
            tmp_path / "nothere.jsonl",
            "--out",
            tmp_path / "a" / "b" / "r",
        )
    with pytest.raises(SystemExit, match=r"error: Mods_Rob of 99 modules"):
        cli(
            "run",
            "--model",
            tiny,
            "--data",
            data,
            "--k",
            99,
            "--n-task",
            4,
            "--out",
            tmp_path / "r",
        )
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "tiny"]


def test_python_api_misuse_is_a_clear_error(tiny, tmp_path):
    """item 14: C=0 gave NaN weights, [p, p] updated twice, NaN features scored, NaN temperature."""
    X = torch.randn(20, 4)
    y = torch.tensor([0, 1] * 10)
    with pytest.raises(SwatError, match=r"C must be a finite number > 0, not 0"):
        probe.LogisticProbe(C=0)
    fitted = probe.LogisticProbe().fit(X, y)
    with pytest.raises(SwatError, match=r"features to score must be finite"):
        fitted.score(torch.full((20, 4), math.nan), y)
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(SwatError, match=r"a parameter is listed twice"):
        train.AdamW([p, p])
    with pytest.raises(SwatError, match=r"lr must be a finite number >= 0, not nan"):
        train.AdamW([p], lr=math.nan)
    net, tok = model.load(tiny)
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(SwatError, match=r"temperature must be a finite number >= 0, not nan"):
        model.generate(net, [ids], temperature=math.nan)
    with pytest.raises(SwatError, match=r"top_p must be a number in \[0, 1\], not -0.5"):
        model.generate(net, [ids], temperature=1.0, top_p=-0.5)
    with pytest.raises(SwatError, match=r"batch_size must be an integer >= 1, not 0"):
        train.train(net, tok, CHATS, str(tmp_path / "o"), batch_size=0)
    assert not os.path.exists(tmp_path / "o")


def test_a_very_large_chat_template_loads_in_linear_time(tmp_path):
    """item 15: a quadratic regex took 80 s on a large template."""
    big = "{{ '<|im_start|>system\\n' }}" * 20000 + "<|im_start|>system\n" * 20000
    make_tokenizer(str(tmp_path), big)
    start = time.time()
    tokenizer.Tok(str(tmp_path))
    assert time.time() - start < 3


def test_one_writer_per_output_and_stale_locks_are_taken_over(tiny, tmp_path):
    """A second run into an output another run is writing stops at once, in one line; the first
    is untouched and finishes whole. A lock left by a dead process is taken over; a file of that
    name that is not a lock of swat-min's is never removed."""
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "o"
    command = [sys.executable, os.path.join(ROOT, "swat_min.py"), "train", "--model", tiny,
               "--data", str(data), "--out", str(out), "--lr", "1e-3"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(command + ["--steps", "40"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        first.send_signal(signal.SIGSTOP)  # paused while it holds the folder
        second = subprocess.run(command + ["--steps", "1"], env=env, capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        assert second.returncode == 1 and "Traceback" not in second.stderr
        message = second.stderr.strip()
        assert "\n" not in message and f"pid {first.pid}" in message
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=600) == 0
    assert json.load(open(out / "trainer.json"))["step"] == 40
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "o", "tiny"]  # no lock left
    # a lock whose process is gone is stale: the next run takes it over and removes it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    lock = tmp_path / ".o.swat-lock"
    host = __import__("socket").gethostname()
    lock.write_text(json.dumps({"written_by": "swat-min", "pid": int(dead), "host": host}))
    cli("train", "--model", tiny, "--data", data, "--out", out, "--steps", 1)
    assert not lock.exists()
    # the user's own file of that name is not a lock of swat-min's: it is refused, and kept
    lock.write_text("my notes")
    with pytest.raises(SystemExit, match=r"another swat-min run \(unknown\)"):
        cli("train", "--model", tiny, "--data", data, "--out", out, "--steps", 1)
    assert lock.read_text() == "my notes"


def test_a_diverging_run_stops_before_a_checkpoint_with_the_step_and_a_hint(tiny, tmp_path):
    """--lr 1e10 made a whole-looking checkpoint of ~1e10-sized weights; a loss that shoots up
    went on. Both stop now, naming the step and --lr, and leave no checkpoint behind."""
    data = write_data(tmp_path / "d.jsonl")
    # exploded weights at the save; a non-finite loss next step; an exploding, finite loss
    for steps, lr, what in (
        (1, 1e10, "exploded by"),
        (3, 1e10, "non-finite"),
        (8, 1, "exploded at"),
    ):
        out = tmp_path / f"o{steps}"
        with pytest.raises(SystemExit, match=rf"{what}.* step \d.*lower --lr") as stop:
            cli("train", "--model", tiny, "--data", data, "--out", out, "--steps", steps,
                "--lr", lr, "--batch", 4)  # fmt: skip
        assert "\n" not in str(stop.value.code)
        assert not (out / "model.safetensors").exists()
    # an ordinary rate is not taken for a divergence
    cli("train", "--model", tiny, "--data", data, "--out", tmp_path / "ok", "--steps", 3,
        "--lr", "1e-3")  # fmt: skip
    assert (tmp_path / "ok" / "model.safetensors").exists()


def test_a_probe_cache_inside_the_model_folder_is_refused(tiny, tmp_path):
    before = snapshot(tiny)
    with pytest.raises(SystemExit, match=r"would overwrite the input"):
        cli("probe", "--model", tiny, "--cache", os.path.join(tiny, "features"))
    assert snapshot(tiny) == before


def test_refused_runs_leave_nothing(tiny, tmp_path):
    """A run refused for its input (a prompt too long, an evaluation prompt in the tuning data)
    leaves no folder behind, not even a log."""
    from swatkit import data as builtin_data

    long = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "x"}]
    prompt = builtin_data.builtin("harmful", "test")[0]
    leaked = [{"role": "system", "content": "s"}, {"role": "user", "content": prompt}, long[1]]
    for name, chat in (("long", long), ("leaked", leaked)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps({"messages": chat}) + "\n")
        with pytest.raises(SystemExit):
            cli("train", "--model", tiny, "--data", path, "--out", tmp_path / "o" / "p" / "q",
                "--max-len", 64)  # fmt: skip
        assert not (tmp_path / "o").exists()
    assert sorted(os.listdir(tmp_path)) == ["leaked.jsonl", "long.jsonl", "tiny"]


def test_the_readme_entry_points_refuse_what_the_cli_refuses(tiny, tmp_path, monkeypatch):
    """The Python API raises SwatError, one line, where the CLI would refuse; and a scan stopped
    by an error leaves the weights exactly as they were."""
    net, tok = model.load(tiny)
    base = swat_min.baseline(net, tok)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def select(**settings):
        settings = dict(dict(n=4, k=2), **settings)
        return rb.select_mods_rob(net, tok, *base["train"], base["probes"], **settings)

    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    cases = [
        (lambda: probe.features(net, tok, "one prompt"), "a list of prompts"),
        (lambda: probe.features(net, tok, []), "no instructions"),
        (lambda: probe.labelled(torch.zeros(2, 3, 4), torch.zeros(3, 3, 5)), "different shapes"),
        (lambda: select(scale=0), "scale must be a finite number > 0"),
        (lambda: select(n=0), "n and repeats must be integers >= 1"),
        (lambda: select(metric="best"), "metric must be readout or later"),
        (lambda: select(tolerance=math.nan), "tolerance must be a finite number"),
        (lambda: train.warmup_length("fast", steps=4), "unknown strategy 'fast'"),
        (lambda: train.train(net, tok, [chat], str(tmp_path / "o"), "swat", {(9, "q")}, steps=1),
         r"mods holds \(9, 'q'\)"),
        (lambda: train.train(net, tok, [chat[:1]], str(tmp_path / "o"), steps=1),
         "must end with the assistant's reply"),
        (lambda: evaluation.evaluate(net, tok, "x", [], ["hi"], max_new_tokens=4),
         "no harmful prompts"),
        (lambda: evaluation.evaluate(net, tok, "x", ["a"], ["b"], max_new_tokens=0),
         "max_new_tokens must be an integer >= 1"),
        (lambda: model.generate(net, [[1, 2]], max_new_tokens=-1), "max_new_tokens must be >= 0"),
    ]  # fmt: skip
    for call, words in cases:
        with pytest.raises(SwatError, match=words) as refused:
            call()
        assert "\n" not in str(refused.value)
    assert not (tmp_path / "o").exists()
    calls = {"n": 0}
    real = rb.features_from

    def fails_on_the_third(*a, **k):  # an error with a module's noise in place
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory")
        return real(*a, **k)

    monkeypatch.setattr(rb, "features_from", fails_on_the_third)
    with pytest.raises(RuntimeError):
        select()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_a_symlinked_output_is_refused_and_its_target_kept(tiny, tmp_path):
    """A --out that is a symbolic link was moved aside and training ended in an rmtree error."""
    data = write_data(tmp_path / "d.jsonl")
    cli("train", "--model", tiny, "--data", data, "--out", tmp_path / "ck", "--steps", 1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "s.json").write_text("{}")
    for target in ("ck", "mine", "s.json"):
        link = tmp_path / f"link-{target}"
        link.symlink_to(tmp_path / target)
        kept = snapshot(tmp_path / target) if target != "s.json" else None
        command = ["train", "--model", tiny, "--data", data, "--out", link, "--steps", 1]
        if target == "s.json":
            command = ["scan", "--model", tiny, "--n", 4, "--k", 2, "--out", link]
        with pytest.raises(SystemExit, match=r"is a symbolic link"):
            cli(*command)
        assert link.is_symlink()
        if kept is not None:
            assert snapshot(tmp_path / target) == kept
    assert (tmp_path / "s.json").read_text() == "{}"
