"""`verify=true`: the run compared with the single-device run of the same seed, data and steps
(`bench.measure.parity` has the rule). The reference runs once per configuration, as one rank on this machine
whatever launched the run being verified, and is cached under `<results_dir>/.parity-reference/<key>/`, read and
built under the lock `<key>.lock` beside it: runs verified together build it once."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.launch import Worker, launch, one_rank_here
from bench.measure import parity
from bench.measure.rows import global_losses
from bench.results import write_json_atomic
from bench.run import Run
from bench.runfolder import PARAMS, read_rank_results

log = logging.getLogger("bench")

MARKER = "reference.json"  # written last: a reference folder without it was not run whole


def reference_run(run: Run) -> Run:
    """The single-device run `run` is compared with."""
    cfg = run.config
    # one local process, whatever launched the run being verified (on SLURM: on the controller's machine)
    return run.replace(
        strategy={"name": "single"}, parallel={"dp": 1, "tp": 1, "pp": 1}, launch=one_rank_here(cfg),
        precision="fp32", grad_accum=1, compile=False, activation_checkpointing=False, verify=True, progress=False,
        peak_tflops=None, fault={**cfg["fault"], "rank": None},
        profile={**cfg["profile"], "enabled": False, "memory": False})


def reference_key(ref: Run) -> str:
    """What the reference's numbers depend on: runs that agree on it can share one reference."""
    keys = ("model", "data", "seed", "global_batch", "steps", "optim", "device")
    fingerprint = {k: ref.config[k] for k in keys} | {"torch": torch.__version__}
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


class ReferenceInterrupted(KeyboardInterrupt):
    """The controller was signalled while the reference ran (its launch stopped it): the run ends interrupted, as
    at any other moment, rather than recorded as verified against nothing."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def run_reference(run: Run, worker: Worker) -> tuple[dict, Path]:
    """The reference's rank results and its parameters file: run once, then cached by configuration; a cache
    that does not read back whole is run again. Under the reference's lock: two runs started together in one
    results folder shared its folder, and the second's launch cleared the first's result files as stale (2 of 6
    trials: "reference run failed: None"); now the second waits and reuses the reference. The parameters file
    is read after the lock is released: only a run that finds the cache broken rebuilds it, and it was whole."""
    ref = reference_run(run)
    ref_dir = Path(run.config["results_dir"]) / ".parity-reference" / reference_key(ref)
    with reference_lock(ref_dir):
        cached = cached_reference(ref_dir)
        if cached is not None:
            return cached, ref_dir / PARAMS
        return build_reference(ref, ref_dir, worker), ref_dir / PARAMS


@contextmanager
def reference_lock(ref_dir: Path):
    """An exclusive lock on `<ref_dir>.lock`, beside the reference's folder, held for the block: whoever holds it
    alone reads, clears or builds the folder (flock: not across NFS clients, where it may not hold). The file
    stays: removing it would let a third run lock a new file while a second still holds the old one."""
    ref_dir.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(ref_dir.with_name(f"{ref_dir.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("verify: waiting for another run building the single-device reference in %s", ref_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def build_reference(ref: Run, ref_dir: Path, worker: Worker) -> dict:
    """Run the reference into `ref_dir` (under its lock), its marker written last; its rank result."""
    ref_dir.mkdir(parents=True, exist_ok=True)
    (ref_dir / MARKER).unlink(missing_ok=True)
    ref.save(ref_dir)
    log.info("verify: running the single-device reference in %s", ref_dir)
    outcome = launch(ref.config, ref_dir, worker)
    if outcome.status == "interrupted":
        raise ReferenceInterrupted(outcome.signal)
    ranks = read_rank_results(ref_dir, 1, outcome.launch_id)
    if outcome.status != "ok" or 0 not in ranks or not (ref_dir / PARAMS).is_file():
        raise RuntimeError(f"the single-device reference run failed ({ref_dir}): {outcome.error}")
    write_json_atomic(ref_dir / MARKER, {"launch_id": outcome.launch_id})
    return ranks[0]


def cached_reference(ref_dir: Path) -> dict | None:
    """The cached reference's rank result, if the cache is whole: its marker, its rank file from the same launch
    and a parameters file that loads."""
    try:
        launch_id = json.loads((ref_dir / MARKER).read_text())["launch_id"]
        torch.load(ref_dir / PARAMS, weights_only=True)
    except Exception:  # missing, cut off, not JSON, not a tensor file: run the reference again
        return None
    return read_rank_results(ref_dir, 1, launch_id).get(0)


def verify_parity(run: Run, run_dir: Path, ranks: list[dict], warnings: list[str], worker: Worker) -> dict:
    """Compare this run's losses and final parameters with the single-device reference. When the comparison
    cannot be made, the parity fields stay null and a warning says why (the run itself still measured); a signal
    while the reference runs ends the run (`ReferenceInterrupted`)."""
    try:
        ref_rank, ref_params = run_reference(run, worker)
        fields = parity.parity_fields(run.config, global_losses(ranks), run_dir / PARAMS, ref_rank["loss"],
                                      ref_params, run.strategy.parity)
    except Exception as exc:
        warnings.append(f"verify: not compared with one device: {type(exc).__name__}: {exc}")
        return {}
    if not fields["parity_ok"]:
        warnings.append(parity_warning(fields))
    return fields


def parity_warning(row: dict) -> str:
    return (f"parity FAILED: max relative difference {row['parity_max_rel_diff']:.3g} from strategy=single "
            f"(loss {row['parity_loss_max_rel_diff']:.3g}, parameters {row['parity_param_max_rel_diff']:.3g}) "
            f"exceeds the tolerance {row['parity_tolerance']:.0e}")
