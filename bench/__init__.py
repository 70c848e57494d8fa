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
