"""FSDP2 under torchrun, on CPU: two gloo processes train exactly as one process does (ift, swat,
mllr), SWAT's frozen modules stay bit-identical through phase 1, the checkpoint is an ordinary HF
one, and an interrupted run resumes to the same weights."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import swat_min
from conftest import ROOT, data_file

WORKER = os.path.join(ROOT, "tests", "fsdp_worker.py")


def train_argv(tiny, data, out, *extra):
    argv = ["train", "--model", tiny, "--data", data, "--out", out, "--device", "cpu"]
    argv += ["--batch", 4, "--lr", 1e-4, "--seed", 3, "--weight-decay", 0.01] + list(extra)
    return [str(a) for a in argv]


def torchrun(argv, stop=0, env=None):
    """swat_min.py's command line in two gloo processes; -> the finished process."""
    env = dict(os.environ, SWAT_TEST_STOP=str(stop), OMP_NUM_THREADS="1", **(env or {}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--standalone", WORKER] + argv
    # its own process group: on a timeout, the workers go with it
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def one_process(tiny, data, out, extra):
    """The same steps in one process: each batch of 4 as two micro-batches of 2, the halves the
    two processes take (the same examples, loss normalisation and gradient sum)."""
    argv = train_argv(tiny, data, out, *extra)
    argv[argv.index("--batch") + 1] = "2"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: sums split the same way
    os.environ["OMP_NUM_THREADS"] = "1"  # so that main() keeps it
    try:
        swat_min.main(argv + ["--accum", "2"])
    finally:
        os.environ.pop("OMP_NUM_THREADS")
        torch.set_num_threads(threads)


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


SETTINGS = {
    "ift": ["--steps", 3],
    "swat": ["--steps", 2, "--warmup-steps", 2, "--mods", "0:q;2:o"],
    "mllr": ["--steps", 3, "--mods", "q,k", "--ratio", 0.1],
}


@pytest.mark.parametrize("strategy", ["ift", "swat", "mllr"])
def test_two_processes_train_as_one(tiny, tmp_path, strategy):
    data = data_file(tmp_path)
    extra = ["--strategy", strategy] + SETTINGS[strategy]
    one_process(tiny, data, tmp_path / "one", extra)
    done = torchrun(train_argv(tiny, data, tmp_path / "two", *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    # the first process speaks for both: each line once, not once per process
    assert done.stdout.count("tuning set:") == 1 and done.stdout.count("wrote ") == 1
    one = weights(tmp_path / "one")
    two = weights(tmp_path / "two")
    start = weights(tiny)
    assert max_diff(one, start) > 1e-4  # it trained
    assert max_diff(one, two) <= 1e-6
    # the same log, step for step (the loss of the whole batch, summed over the processes)
    logs = [open(tmp_path / f / "log.jsonl").read().splitlines() for f in ("one", "two")]
    losses = [[json.loads(line)["loss"] for line in log] for log in logs]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5) and len(losses[0]) == 3 + (
        strategy == "swat"
    )


def test_swat_phase_one_leaves_the_other_modules_bit_identical(tiny, tmp_path):
    data = data_file(tmp_path)
    argv = train_argv(tiny, data, tmp_path / "w", "--strategy", "swat", "--mods", "0:q;2:o")
    done = torchrun(argv + ["--steps", "0", "--warmup-steps", "3"])
    assert done.returncode == 0, done.stderr[-3000:]
    start = weights(tiny)
    after = weights(tmp_path / "w")
    robust = ("model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.o_proj")
    for name in start:
        if name.startswith(robust):
            assert not torch.equal(start[name], after[name]), name
        else:
            assert torch.equal(start[name], after[name]), name


def test_an_interrupted_run_resumes_to_the_same_weights_in_hf_format(tiny, tmp_path):
    import transformers

    data = data_file(tmp_path)
    extra = ["--strategy", "swat", "--steps", 3, "--warmup-steps", 2, "--mods", "1:v,o"]
    one_process(tiny, data, tmp_path / "one", extra)
    argv = train_argv(tiny, data, tmp_path / "two", *extra, "--save-every", 2)
    cut = torchrun(argv, stop=4)  # interrupted as step 4 starts: the checkpoint of step 2 stays
    assert cut.returncode != 0
    trainer = json.load(open(tmp_path / "two" / "trainer.json"))
    assert trainer["step"] == 2
    done = torchrun(argv + ["--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    # two ranks sum their gradients in another order than one process does: the last bits differ
    # by machine (1.1e-6 seen); a resume that lost the optimizer's state would be off by ~lr
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) <= 1e-5
    # an ordinary HF checkpoint: transformers loads it, every weight the gathered whole one
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    ours = weights(tmp_path / "two")
    assert all(torch.equal(hf[k], ours[k]) for k in ours)


def test_bf16_weights_train_under_torchrun_with_stochastic_rounding(tiny, tmp_path):
    data = data_file(tmp_path)
    argv = train_argv(tiny, data, tmp_path / "b", "--dtype", "bf16", "--steps", 2)
    done = torchrun(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    after = weights(tmp_path / "b")
    start = weights(tiny)
    assert all(t.dtype == torch.bfloat16 and t.isfinite().all() for t in after.values())
    assert max_diff({k: v.float() for k, v in after.items()}, start) > 1e-4


def test_run_under_torchrun_makes_the_one_process_run(tiny, tmp_path):
    data = data_file(tmp_path)
    argv = ["run", "--model", tiny, "--data", data, "--device", "cpu", "--steps", 2, "--batch", 4]
    argv += ["--lr", 1e-4, "--n-scan", 4, "--n-eval", 3, "--max-new-tokens", 3, "--n-task", 4]
    argv += ["--n-acc", 0, "--select", "topk", "--k", 3, "--drift-every", 1, "--warmup-frac", 1]
    argv += ["--strategies", "ift", "swat", "mllr"]
    argv = [str(a) for a in argv]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process
    try:
        swat_min.main(argv + ["--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    scratch = tmp_path / "scratch"  # where the second process's scratch folder goes
    scratch.mkdir()
    done = torchrun(argv + ["--out", str(tmp_path / "two")], env={"TMPDIR": str(scratch)})
    assert done.returncode == 0, done.stderr[-3000:]
    # the second process's files: made, then deleted (torchrun keeps a folder of its own there)
    assert [p for p in scratch.iterdir() if p.name.startswith("swat-min")] == []
    assert done.stdout.count("== scan:") == 1 and done.stdout.count("/results.json") == 1
    # the same files, the same rows: each tuning sharded, each evaluation on the whole model
    assert sorted(os.listdir(tmp_path / "one")) == sorted(os.listdir(tmp_path / "two"))
    rows = [json.load(open(tmp_path / f / "results.json"))["rows"] for f in ("one", "two")]
    assert [r["strategy"] for r in rows[0]] == [r["strategy"] for r in rows[1]]
    assert len(rows[0]) == 4
    for a, b in zip(*rows):
        for key in ("asr", "over_refusal", "probe_acc", "n_mods", "mods", "warmup_steps"):
            assert a.get(key) == b.get(key), key
        for key in ("drift", "task_loss", "update_mods_rob", "update_rest"):
            assert a.get(key) == (b.get(key) if key not in a else pytest.approx(b[key], rel=1e-4))
        curves = [[p["probe_acc"] for p in r.get("drift_curve", [])] for r in (a, b)]
        assert curves[0] == curves[1]
    for name in ("ift", "swat", "mllr"):
        answers = [
            open(tmp_path / f / f"{name}-seed0" / "generations.jsonl").read()
            for f in ("one", "two")
        ]
        assert answers[0] == answers[1]
        one = weights(tmp_path / "one" / f"{name}-seed0")
        two = weights(tmp_path / "two" / f"{name}-seed0")
        assert max_diff(one, weights(tiny)) > 1e-5 and max_diff(one, two) <= 1e-5, name
    assert len(rows[1][2]["drift_curve"]) == 1 + 2 + rows[1][2]["warmup_steps"]


def test_only_train_and_run_run_under_torchrun(tiny, tmp_path):
    done = torchrun(["eval", "--model", tiny, "--device", "cpu"])
    assert done.returncode != 0 and "under torchrun only `train` and `run` run" in done.stderr
    # LoRA in one process only: refused before any work (run's probes and scan take minutes)
    argv = ["run", "--model", tiny, "--data", data_file(tmp_path), "--lora-rank", "4"]
    done = torchrun([str(a) for a in argv + ["--out", tmp_path / "r", "--device", "cpu"]])
    assert done.returncode != 0 and "LoRA under torchrun is not supported" in done.stderr
    assert not os.path.exists(tmp_path / "r") and "features" not in done.stderr
