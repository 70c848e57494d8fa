"""bench: a benchmark harness for distributed training in PyTorch."""

from pathlib import Path

__version__ = "0.1.0"


def conf_dir() -> Path:
    """The config tree (conf/ at the top of a checkout; shipped inside the wheel as bench/conf). It is also the
    registry: a strategy, model, data source or launcher exists when its .yaml is in its group's folder."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"bench's config folder is missing: looked in {here / 'conf'} and {here.parent / 'conf'}")


def group_options(group: str) -> list[str]:
    """The options of a config group (`strategy`, `model`, ...), i.e. its .yaml files' names, sorted."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def quiet_controller_logs() -> None:
    """The controller's own C++ warnings and errors (a store being retried during a rendezvous, each with its
    stack of C++ frames: 134 lines for one unreachable endpoint) stay out of the terminal: bench says in one line
    what failed. torch reads TORCH_CPP_LOG_LEVEL once, when it loads, so the variable is set for the import and
    taken back, and the ranks, which inherit the environment, keep every warning. Not with launch=inline, where
    this process is a rank."""
    import os
    import sys

    if "torch" in sys.modules or "TORCH_CPP_LOG_LEVEL" in os.environ or "launch=inline" in sys.argv:
        return
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    import torch  # noqa: F401

    del os.environ["TORCH_CPP_LOG_LEVEL"]
