"""The trainer's bookkeeping for one output folder, behind four calls so that train.train reads as
the method: open (finish or roll back an interrupted save, check the folder), start (resume from a
checkpoint of the same run, or begin a new log), record (a step's row, appended to log.jsonl) and
save (an atomic checkpoint). Under torchrun only the first process writes."""

import hashlib
import json
import os

from . import distributed
from .checkpoint import load_trainer, read_log, recover, save_trainer
from .files import SwatError, check_folder, claim, write_text


EXPLODED = 1e4  # a weight this large means training diverged


class RunLog:
    """The checkpoint folder `out` of one training run (created by swat-min, or one it wrote)."""

    def __init__(self, out, tok):
        self.out = os.path.abspath(os.fspath(out))
        self.tok = tok
        self.main = distributed.rank() == 0  # under torchrun only the first one writes
        if self.main:
            recover(self.out)  # a save that a fault interrupted is finished (or rolled back) first
        check_folder(self.out, tok)  # checked now, not after the training
        self.log = os.path.join(self.out, "log.jsonl")
        self.saved = 0  # the step of the checkpoint in out (0: none yet)

    def settings(self, opt, source, data, **settings):
        """What the updates depend on besides the groups: saved with every checkpoint and checked by
        resume, so that a run is never continued with another model, data or settings unsaid."""
        data_hash = hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]
        opt.settings = dict(
            settings, model=source, data=data_hash
        )  # source: the start's fingerprint

    def start(self, opt, net, resume, total):
        """-> (the step to start from, the log rows so far): a checkpoint's when resuming."""
        step = 0
        rows = []
        if resume and os.path.exists(os.path.join(self.out, "trainer.json")):
            step = load_trainer(opt, net, self.out)
            rows = read_log(self.log, step)  # the steps after the checkpoint are done again
            self.saved = step
            if step == total:  # a finished run: its final checkpoint stands as it is
                print(f"{self.out}: already complete ({total} steps)")
                return step, rows
        elif resume:
            print(f"{self.out}: no checkpoint to resume from; starting afresh")
        if self.main:  # the folder is swat-min's from now on; the log grows at every step
            claim(self.out, "log.jsonl")
        if self.main and step == 0:
            write_text(self.log, "")
        return step, rows

    def record(self, row):
        """One step's row, appended to log.jsonl."""
        if self.main:
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def save(self, net, opt, step, rows, moments=True):
        """A checkpoint of step into out (atomically: a fault leaves the last whole one), unless
        the weights have exploded: no fine-tuned network holds a weight of 10^4 (a runaway rate
        does, e.g. --lr 1e10), and such a checkpoint would look whole and be garbage."""
        # each process's own shards (FSDP2), then one all-reduce for the largest over all of them
        shards = [distributed.local(p.detach()) for p in net.parameters()]
        largest = distributed.peak(max(float(t.abs().max()) for t in shards if t.numel()))
        if not largest < EXPLODED:
            raise SwatError(
                f"the weights exploded by step {step} (largest |w| = {largest:.3g}); not saved "
                f"(lower --lr); {self.kept()}"
            )
        save_trainer(net, self.tok, opt, self.out, step, rows, moments=moments)
        self.saved = step

    def kept(self):
        """What a run stopped now leaves in out, in words."""
        if self.saved:
            return f"{self.out} keeps the checkpoint of step {self.saved}"
        return "no checkpoint was saved"
