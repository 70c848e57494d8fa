"""Launchers without starting anything: the command line before Hydra (the legacy `--local-rank`, the run folder
every node agrees on), and the world a rank reads from torchrun or an srun step. The launch keys' checks are in
test_configs.py; real launches in tests/integration/test_launch_runs.py."""

import pytest

from bench.launch import world as launch_world

# --------------------------------------------------------------------------- command line, environment, checks


@pytest.mark.parametrize(
    "argv",
    [["--local-rank=1", "a=1"], ["--local_rank=1", "a=1"], ["--local-rank", "1", "a=1"], ["a=1", "--local_rank", "1"]],
)
def test_legacy_local_rank_argument_is_taken_out_before_hydra(argv):
    env = {}
    assert launch_world.strip_local_rank(["bench", *argv], env) == ["bench", "a=1"]
    assert env == {"LOCAL_RANK": "1"}


def test_local_rank_without_a_number_is_refused():
    with pytest.raises(SystemExit, match="expects a rank number"):
        launch_world.strip_local_rank(["bench", "--local-rank"], {})


def test_multinode_and_inline_runs_get_a_run_folder_every_node_agrees_on():
    name = "${strategy.name}_${model.name}"
    argv = launch_world.prepare_argv(["bench", "launch=multinode", "launch.rdzv_id=job 42"], name, env={})
    assert "hydra.run.dir=${results_dir}/multinode/job-42_${strategy.name}_${model.name}" in argv
    assert "hydra.sweep.dir=${results_dir}/sweeps/multinode-job-42" in argv

    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "abc"}
    argv = launch_world.prepare_argv(["bench", "launch=inline"], name, env=env)
    assert "hydra.run.dir=${results_dir}/inline/abc_${strategy.name}_${model.name}" in argv
    assert "hydra.output_subdir=null" in argv, "ranks other than 0 write no .hydra/ of their own"

    srun = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    assert "hydra.run.dir=${results_dir}/inline/7.0_x" in launch_world.prepare_argv(["b", "launch=inline"], "x", srun)

    mine = ["bench", "launch=multinode", "launch.rdzv_id=j", "hydra.run.dir=/somewhere"]
    assert not any(a.startswith("hydra.run.dir=$") for a in launch_world.prepare_argv(mine, name, env={}))
    assert launch_world.prepare_argv(["bench", "strategy=ddp"], name, env={}) == ["bench", "strategy=ddp"]


def test_ranks_read_their_world_from_torchrun_or_an_srun_step():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert launch_world.launched_world(torchrun) == launch_world.LaunchedWorld(3, 4, 1, 2, "torchrun")
    step = {
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "5",
        "SLURM_STEP_NUM_TASKS": "6",
        "SLURM_LOCALID": "2",
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "3(x2)",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "99",
    }
    world = launch_world.launched_world(step)
    assert (world.rank, world.world_size, world.local_rank, world.local_world_size, world.nnodes) == (5, 6, 2, 3, 2)
    launch_world.export_torch_env_from_slurm(step)
    assert (step["RANK"], step["WORLD_SIZE"], step["LOCAL_RANK"], step["LOCAL_WORLD_SIZE"]) == ("5", "6", "2", "3")
    assert step["MASTER_ADDR"] == "gpu07" and 20000 <= int(step["MASTER_PORT"]) < 60000
    # an sbatch script's batch step describes the allocation, not this process: a world of one
    batch = {"SLURM_JOB_ID": "99", "SLURM_PROCID": "0", "SLURM_NTASKS": "16"}
    assert launch_world.launched_world(batch).world_size == 1


# --------------------------------------------------------------------------- real runs




# --------------------------------------------------------------------------- a deadline's SIGUSR1, and whom it reaches


def test_a_node_whose_address_is_the_endpoint_hosts_the_rendezvous_store():
    """torch hosts the store where the endpoint is the host name or what it resolves to: an IP of this machine's
    that the name does not resolve to (here: the address it routes from; in launch/emulated-nodes.sh a network
    namespace's) is hosted by bench's say-so; a name torch matches, or another machine, keeps torch's guess."""
    import socket

    from bench.launch.agent import address_towards
    from bench.launch.multinode import hosts_the_store

    assert hosts_the_store("localhost") == {} and hosts_the_store(socket.gethostname()) == {}, "torch's own guess"
    assert hosts_the_store("192.0.2.123") == {}, "another machine (TEST-NET-1: documentation only)"
    own = address_towards("192.0.2.123")  # the address this machine routes from
    if own and own not in socket.gethostbyname_ex(socket.gethostname())[2] and not own.startswith("127."):
        assert hosts_the_store(own) == {"is_host": True}


def test_a_multinode_launch_with_a_reused_rdzv_id_starts_without_the_earlier_runs_pids(tmp_path, monkeypatch):
    """The run folder is named after the rendezvous id: a reused id found the earlier run's `pids/`, whose pids
    other processes may have by now, and at a timeout each was sent SIGUSR1, which kills by default."""
    from bench.launch import LaunchOutcome, Worker, multinode

    for folder in ("ranks", "pids", "stacks", "collectives"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "rank0").write_text("1")
    seen = {}

    def run_ranks(config, worker, run_dir, cfg, all_ranks_here=True):
        seen.update({p.name: sorted(q.name for q in p.iterdir()) for p in run_dir.iterdir()})
        return LaunchOutcome("ok")

    monkeypatch.setattr(multinode, "run_ranks", run_ranks)
    monkeypatch.setattr(multinode, "launch_config", lambda *args, **kwargs: None)
    cfg = {"launch": {"rdzv_id": "job-1", "nnodes": 1, "nproc": 1, "rdzv_endpoint": "127.0.0.1:29500",
                      "rdzv_timeout_s": 10}}
    assert multinode.launch(cfg, tmp_path, Worker("bench.rank.worker", "train_rank")).status == "ok"
    assert not any(seen.get(folder) for folder in ("ranks", "pids", "stacks", "collectives")), seen


RANK_THAT_DUMPS = """
import faulthandler, os, signal, sys, time
from pathlib import Path
run_dir = Path(sys.argv[1])
stack = open(run_dir / "stacks" / "rank3.txt", "w")
faulthandler.register(signal.SIGUSR1, file=stack, all_threads=True)
(run_dir / "stacks" / "rank3_collectives.json").write_text('{"entries": []}')
start = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]
(run_dir / "pids" / "rank3").write_text(f"{os.getpid()} {start}")
time.sleep(30)
"""


def test_at_a_deadline_only_the_ranks_this_controller_started_are_asked_for_their_stacks(tmp_path):
    """A `pids/rank<N>` file is signalled only if its process is this controller's child (the ranks are: torch's
    agent runs in the controller) that started when the file says, or, for a file holding the pid alone, no
    later than the file was written. Here three processes have a file's pid and are not its rank: each of them
    used to be killed by the SIGUSR1."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from bench.launch.watch import collect_stacks

    for folder in ("pids", "stacks"):
        (tmp_path / folder).mkdir()
    stale, younger = subprocess.Popen(["sleep", "30"]), subprocess.Popen(["sleep", "30"])
    shell = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    not_mine = int(shell.stdout.readline())  # the shell's child, not this process's
    rank = subprocess.Popen([sys.executable, "-c", RANK_THAT_DUMPS, str(tmp_path)])
    try:
        (tmp_path / "pids" / "rank0").write_text(f"{stale.pid} 1")  # started at another time than its record's
        (tmp_path / "pids" / "rank1").write_text(str(not_mine))
        (tmp_path / "pids" / "rank2").write_text(str(younger.pid))
        hour_ago = time.time() - 3600
        os.utime(tmp_path / "pids" / "rank2", (hour_ago, hour_ago))  # written before its process started
        end = time.monotonic() + 30
        while not (tmp_path / "pids" / "rank3").is_file():
            assert time.monotonic() < end and rank.poll() is None
            time.sleep(0.05)
        stacks = collect_stacks(tmp_path)
        time.sleep(0.2)  # a SIGUSR1 kills at once
        assert stale.poll() is None and younger.poll() is None and alive(not_mine)
        assert list(stacks) == ["3"], "the rank that wrote its record is asked, and answers"
    finally:
        for proc in (stale, younger, shell, rank):
            proc.kill()
            proc.wait()
        if alive(not_mine):
            os.kill(not_mine, signal.SIGKILL)


def alive(pid: int) -> bool:
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def test_a_slurm_jobs_store_port_is_below_the_ephemeral_range_and_the_same_for_every_task():
    """Outgoing connections take local ports from 32768-60999: a listening port there was once in use
    (EADDRINUSE). Every task of a job computes the same port from the job id, of any form."""
    from bench.launch.slurm import master_port

    ports = {master_port(job_id) for job_id in ("19", "23122", "123_4", "999999")}
    assert all(20000 <= port < 32768 for port in ports) and len(ports) == 4
    assert master_port("19") == master_port("19")
