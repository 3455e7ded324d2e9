"""The porting kit (golden/): it regenerates bit for bit, swat-min passes its own check, and a
deliberately broken copy fails at the stage that is broken."""

import filecmp
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import model
import train
from conftest import ROOT
from golden import kit

FILES = ("kit.safetensors", "manifest.json", "tokenizer.json", "tokenizer_config.json")


def test_the_kit_regenerates_bit_for_bit_and_is_small(tmp_path, capsys):
    for name in ("one", "two"):
        os.makedirs(tmp_path / name)
        kit.make(str(tmp_path / name))
    # one machine makes the same bytes twice; another machine (even one whose torch reports the
    # same CPU capability) may round the last bits differently: the stored kit within tolerance
    for name in FILES:
        assert filecmp.cmp(tmp_path / "one" / name, tmp_path / "two" / name, shallow=False), name
    assert kit.check(str(tmp_path / "one")) is None, capsys.readouterr().out
    assert sum(os.path.getsize(os.path.join(kit.HERE, n)) for n in FILES) <= 5e6
    tensors = load_file(os.path.join(kit.HERE, "kit.safetensors"))
    # the stages hold something to check: the scan moves, the search keeps some, training moves
    assert tensors["scan.loss_rise"].abs().max() > 0
    assert 0 < len(tensors["select.mods_rob"]) <= 4
    start = tensors["weights.a.model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(
        tensors["train.ift.weights.model.layers.0.self_attn.q_proj.weight"], start
    )


def test_swat_min_passes_its_own_kit_from_the_command_line(tmp_path):
    out = str(tmp_path / "dump")
    for argv in (["dump", out], ["check", out]):
        r = subprocess.run(
            [sys.executable, "-m", "golden", *argv], cwd=ROOT, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr[-2000:]
    assert "every stage agrees with the kit" in r.stdout
    # chosen stages only; --help; a missing folder and an unknown stage are one line each
    r = subprocess.run([sys.executable, "-m", "golden", "check", out, "--stages", "forward"],
                       cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and "train.ift" not in r.stdout and "forward" in r.stdout
    r = subprocess.run([sys.executable, "-m", "golden", "--help"], cwd=ROOT, capture_output=True)
    assert r.returncode == 0
    for argv in (["check", str(tmp_path / "none")], ["check", out, "--stages", "nonsense"]):
        r = subprocess.run([sys.executable, "-m", "golden", *argv], cwd=ROOT, capture_output=True,
                           text=True)  # fmt: skip
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def interleaved(x, cos, sin):
    """A classic porting mistake: rotary pairs (2i, 2i+1) instead of HF's halves (i, i + d/2)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)
    return x * cos + rotated * sin


def no_bias_correction(p, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """Another: Adam without its bias correction."""
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    p.addcdiv_(m, v.sqrt().add_(eps), value=-lr)


@pytest.mark.parametrize(
    "where, broken, stage",
    [
        (model, ("rotate", interleaved), "forward"),
        (train, ("adamw_update", no_bias_correction), "train.ift"),
    ],
)
def test_a_broken_copy_fails_at_its_stage(tmp_path, monkeypatch, capsys, where, broken, stage):
    monkeypatch.setattr(where, *broken)
    kit.dump(str(tmp_path))
    assert kit.check(str(tmp_path)) == stage
    out = capsys.readouterr().out
    assert f"first stage that differs: {stage}" in out
    # every stage before it agrees
    stages = list(kit.STAGES)
    for earlier in stages[: stages.index(stage)]:
        assert any(line.split() == [earlier, "ok"] for line in out.splitlines()), earlier


def test_check_names_missing_tensors(tmp_path, capsys):
    assert kit.check(str(tmp_path)) == "tokens"  # an empty dump: the first stage is missing
    assert "missing" in capsys.readouterr().out
