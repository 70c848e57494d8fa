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


