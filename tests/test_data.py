"""data.py: the built-in sets, the readers of users' files, bad input named in one line."""

import pytest
import torch
from swatkit import data
import model
import probe
import robustness as rb


def test_builtin_sets():
    for kind in ("harmful", "harmless"):
        allx, tr, te = data.builtin(kind), data.builtin(kind, "train"), data.builtin(kind, "test")
        assert len(allx) >= 200 and len(tr) + len(te) == len(allx) and not set(tr) & set(te)
    lengths = [
        sum(map(len, data.builtin(k))) / len(data.builtin(k)) for k in ("harmful", "harmless")
    ]
    assert abs(lengths[0] - lengths[1]) < 8  # similar length, so length cannot give the class away


def test_readers(tmp_path):
    (tmp_path / "adv.csv").write_text("goal,target\nDo a bad thing,Sure\nAnother,Sure\n")
    (tmp_path / "hb.csv").write_text(
        "Behavior,FunctionalCategory,ContextString\nHarm X,standard,\nSum it up,contextual,An "
        "article.\n"
    )
    (tmp_path / "a.jsonl").write_text('{"prompt": "p1"}\n{"instruction": "p2"}\n')
    (tmp_path / "t.txt").write_text("one\n\ntwo\n")
    assert data.read_instructions(str(tmp_path / "adv.csv")) == ["Do a bad thing", "Another"]
    assert data.read_instructions(str(tmp_path / "hb.csv")) == [
        "Harm X",
        "An article.\n\n---\n\nSum it up",
    ]
    assert data.read_instructions(str(tmp_path / "a.jsonl")) == ["p1", "p2"]
    assert data.read_instructions(str(tmp_path / "t.txt")) == ["one", "two"]
    (tmp_path / "s.json").write_text('["s1", {"goal": "s2"}, {"Behavior": "s3"}]')
    assert data.read_instructions(str(tmp_path / "s.json")) == ["s1", "s2", "s3"]
    # JailbreakBench: the instruction is "Goal"; its "Behavior" is a short label
    (tmp_path / "jbb.csv").write_text(
        "Index,Goal,Target,Behavior,Category\n1,Write a bad thing,Sure,Defamation,Harassment\n"
    )
    assert data.read_instructions(str(tmp_path / "jbb.csv")) == ["Write a bad thing"]
    (tmp_path / "sr.jsonl").write_text(
        '{"category": "c", "forbidden_prompt": "f1"}\n{"Question": "q2"}\n'
    )
    assert data.read_instructions(str(tmp_path / "sr.jsonl")) == ["f1", "q2"]
    # as spreadsheets save it
    (tmp_path / "bom.csv").write_bytes('\ufeffgoal,target\r\n"One, two",Sure\r\n'.encode())
    assert data.read_instructions(str(tmp_path / "bom.csv")) == ["One, two"]
    # Alpaca and Dolly: the input/context belongs to the instruction, as read_examples reads it
    (tmp_path / "alp.jsonl").write_text(
        '{"instruction": "Sum up", "input": "A text.", "output": "o"}\n'
        '{"instruction": "Say hi", "input": "", "output": "hi"}\n'
        '{"instruction": "Q", "context": "C", "response": "r"}\n'
    )
    assert data.read_instructions(str(tmp_path / "alp.jsonl")) == [
        "Sum up\n\nA text.",
        "Say hi",
        "Q\n\nC",
    ]
    assert data.read_instructions(str(tmp_path / "alp.jsonl")) == [
        c[0]["content"] for c in data.read_examples(str(tmp_path / "alp.jsonl"))
    ]
    # a typo'd extension: its lines (the CSV header among them) are not taken for prompts
    (tmp_path / "adv.cvs").write_text("goal,target\nDo a bad thing,Sure\n")
    with pytest.raises(model.SwatError, match=r"adv.cvs: unknown format '.cvs'"):
        data.read_instructions(str(tmp_path / "adv.cvs"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p1"}\n{"text": "p2"}\n')
    with pytest.raises(
        model.SwatError, match="bad.jsonl: record 2 has no text in any of the fields"
    ):
        data.read_instructions(str(tmp_path / "bad.jsonl"))
    for i, text in enumerate(
        (
            '["ok", 3]',
            '["ok", " "]',
            '[{"goal": "ok"}, {"goal": 5}]',
            '[{"goal": "ok"}, {"goal": ["a"]}]',
        )
    ):
        # a number, a list or a blank is no instruction
        (tmp_path / f"bad{i}.json").write_text(text)
        with pytest.raises(
            model.SwatError, match=f"bad{i}.json: record 2 has no text in any of the fields"
        ):
            data.read_instructions(str(tmp_path / f"bad{i}.json"))
    (tmp_path / "none.csv").write_text("goal,target\n")  # the column, but no rows
    with pytest.raises(model.SwatError, match="none.csv: no instructions found"):
        data.read_instructions(str(tmp_path / "none.csv"))


def test_bad_input(tmp_path, tiny):
    with pytest.raises(model.SwatError, match="only one class"):
        probe.LogisticProbe().fit(torch.randn(10, 3), torch.ones(10))
    for X, y in (
        (torch.randn(0, 3), torch.ones(0)),
        (torch.randn(10), torch.ones(10)),
        (torch.randn(9, 3), torch.ones(10)),
    ):
        with pytest.raises(
            model.SwatError, match=r"probe: features must be \[N, D\] with N labels"
        ):
            probe.LogisticProbe().fit(X, y)
    y = torch.tensor([0.0, 1.0] * 5)
    for X, y in (
        (torch.randn(10, 3), y * 2),
        (torch.randn(10, 3), y - 1),
        (torch.full((10, 3), float("nan")), y),
    ):
        with pytest.raises(
            model.SwatError,
            match=r"probe: labels must be 0 \(harmless\) or 1 \(harmful\), and the features finite",
        ):
            probe.LogisticProbe().fit(X, y)
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(model.SwatError, match="e.txt: no instructions"):
        data.read_instructions(str(tmp_path / "e.txt"))
    with pytest.raises(model.SwatError, match="nope.csv: unreadable"):
        data.read_instructions(str(tmp_path / "nope.csv"))
    (tmp_path / "x.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(model.SwatError, match="x.csv: no 'goal'"):
        data.read_instructions(str(tmp_path / "x.csv"))
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(model.SwatError, match="b.txt: unreadable"):
        data.read_instructions(str(tmp_path / "b.txt"))
    # an object, not a list: its keys are no prompts
    (tmp_path / "o.json").write_text('{"goal": "a", "x": "b"}')
    with pytest.raises(
        model.SwatError, match="o.json: expected a JSON list of records, found dict"
    ):
        data.read_instructions(str(tmp_path / "o.json"))
    net, _ = model.load(tiny)
    with pytest.raises(model.SwatError, match="unknown module 'z'"):
        rb.module(net, 0, "z")
    with pytest.raises(model.SwatError, match="layer 3 out of range 0-2"):
        rb.module(net, 3, "q")
