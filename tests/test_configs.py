"""Every config in conf/ composes, and bad values are refused with a message naming the key."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.config import ConfigError, validate

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "experiment")  # experiment: +experiment=


def compose_plain(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_option_composes_and_validates(group, option):
    cfg = compose_plain(f"{group}={option}")
    assert option.split("-")[0] == cfg[group]["name"], "a config's name is its file's (presets: name-size)"
    if group == "strategy" and option not in ("single", "dataparallel"):  # one-process strategies
        cfg["launch"]["nproc"] = 2
    validate(cfg)


def test_groups_the_contract_names_exist():
    assert {"strategy", "model", "data", "launch"} <= set(GROUPS)
    for key in ("steps", "warmup", "global_batch", "seed", "device", "results_dir"):
        assert key in compose_plain()


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["steps=0"], "steps"),
        (["global_batch=-4"], "global_batch"),
        (["launch.nproc=0"], "launch.nproc"),
        (["warmup=40", "steps=40"], "warmup"),
        (["device=tpu"], "device"),
        (["strategy=single", "launch.nproc=2"], "launch.nproc"),
        (["strategy=ddp", "launch.nproc=2", "global_batch=7"], "global_batch"),
        (["peak_tflops=-1"], "peak_tflops"),
        (["fault.rank=5"], "fault.rank"),
        (["strategy=ddp", "launch.nproc=2", "grad_accum=3", "global_batch=16"], "grad_accum"),
        (["strategy=ddp", "launch.nproc=2", "parallel.tp=2"], "parallel.tp"),
        (["strategy=fsdp", "launch.nproc=2", "precision=fp16"], "precision"),
        (["precision=bf16", "verify=true"], "precision"),
        (
            ["strategy=zero", "launch.nproc=2", "strategy.overlap_with_ddp=true", "device=cpu"],
            "strategy.overlap_with_ddp",
        ),
        (["strategy=dataparallel", "launch.nproc=2"], "launch.nproc"),
        (["strategy=tensor", "launch.nproc=3", "model=gpt", "global_batch=3"], "model.n_heads"),
        (["strategy=tensor", "launch.nproc=2", "model=cnn"], "model"),
        (["strategy=tensor", "launch.nproc=2", "strategy.sequence_parallel=true"], "strategy.sequence_parallel"),
        (["data=files", "data.samples=8"], "data.samples"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}: expected .*, got .*`{key}=`"):
        validate(compose_plain(*overrides))


def test_cuda_requested_without_gpu_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(ConfigError, match="device: expected cpu or auto"):
        validate(compose_plain("device=cuda"))
