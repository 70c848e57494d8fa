"""The parallel degrees of a run (`Degrees`, resolved once from `parallel.*` and the world size) and where a
rank sits in them (`Topology`: world, node, device), checked once.

Ranks are laid out dp-major over a (dp, cp, pp, tp) grid: the tp ranks of one pipeline stage are
consecutive, then the pp stages of one model replica, then its cp ranks (context parallelism: each holds a
share of every sequence), then the replicas. HSDP splits dp into
dp_replicate x dp_shard (the shard groups consecutive, so within a node where a node holds one; the replicas
across nodes), as torchtitan's mesh does. `mesh()` builds the matching named DeviceMesh for the strategies
that need one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from bench.errors import ConfigError


class TopologyError(ConfigError):
    pass


DEGREES = ("dp", "cp", "tp", "pp")  # their product is the world
CONTEXT = "cp"  # a config without the key (one written before it existed) has 1
EXPERT = "ep"  # expert parallelism: ep of the dp ranks split each layer's experts (not a factor of the world)
# dp's split into replicas of shard groups (HSDP): dp_shard = dp / dp_replicate. A config without the key has 1.
REPLICATE = "dp_replicate"


@dataclass(frozen=True)
class Degrees:
    """A layout's parallel degrees: data-parallel replicas x context-parallel ranks x tensor-parallel ranks x
    pipeline stages; the data-parallel ranks are `dp_replicate` replicas of `dp_shard` sharded ranks (HSDP; 1:
    all shard or all replicate, as the strategy does)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    dp_replicate: int = 1
    cp: int = 1
    ep: int = 1

    @property
    def world(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate

    @property
    def label(self) -> str:
        """"dp x tp x pp" as tables print it: "2x1x2"; HSDP's dp as replicas*shards: "2*4x1x1"; context
        parallelism after it: "2x1x1 cp4"."""
        dp = f"{self.dp_replicate}*{self.dp_shard}" if self.dp_replicate > 1 else str(self.dp)
        return (f"{dp}x{self.tp}x{self.pp}" + (f" cp{self.cp}" if self.cp > 1 else "")
                + (f" ep{self.ep}" if self.ep > 1 else ""))

    def as_dict(self) -> dict[str, int]:
        return {"dp": self.dp, "tp": self.tp, "pp": self.pp, REPLICATE: self.dp_replicate, CONTEXT: self.cp,
                EXPERT: self.ep}


def _positive_or_inferred(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
        raise TopologyError(f"parallel.{key}: expected a positive integer or -1 (infer), got {value!r}")


def resolve_degrees(parallel, world_size: int) -> dict[str, int]:
    """`parallel.{dp,cp,tp,pp}` with at most one -1 (inferred) -> degrees whose product is the world size, and
    `parallel.dp_replicate` dividing dp."""
    degrees = {d: parallel.get(d, 1) if d == CONTEXT else parallel[d] for d in DEGREES}
    for d, value in degrees.items():
        _positive_or_inferred(d, value)
    inferred = [d for d, value in degrees.items() if value == -1]
    if len(inferred) > 1:
        raise TopologyError(f"parallel: at most one degree may be -1 (inferred), got -1 for {', '.join(inferred)}")
    known = math.prod(v for v in degrees.values() if v != -1)
    if inferred:
        if world_size % known:
            raise TopologyError(
                f"parallel.{inferred[0]}: cannot infer it, the world size {world_size} is not divisible by the "
                f"other degrees' product {known}. Change parallel.* or launch.nproc"
            )
        degrees[inferred[0]] = world_size // known
    if math.prod(degrees.values()) != world_size:
        raise TopologyError(
            "parallel: expected dp*cp*tp*pp == world size (launch.nnodes*launch.nproc = "
            f"{world_size}), got {'*'.join(str(v) for v in degrees.values())} = {math.prod(degrees.values())}. "
            "Change parallel.dp/cp/tp/pp (or set one to -1 to infer it) or launch.nproc"
        )
    replicate = parallel.get(REPLICATE, 1)
    if isinstance(replicate, bool) or not isinstance(replicate, int) or replicate < 1:
        raise TopologyError(f"parallel.{REPLICATE}: expected a positive integer (1: no replicas), got {replicate!r}. "
                            f"Change `parallel.{REPLICATE}=` on the command line.")
    if degrees["dp"] % replicate:
        raise TopologyError(
            f"parallel.{REPLICATE}: expected a divisor of the data-parallel degree {degrees['dp']} (each replica "
            f"shards over dp / {REPLICATE} ranks), got {replicate}. Change `parallel.{REPLICATE}=` (or parallel.dp) "
            "on the command line."
        )
    expert = parallel.get(EXPERT, 1)
    if isinstance(expert, bool) or not isinstance(expert, int) or expert < 1 or degrees["dp"] % expert:
        raise TopologyError(f"parallel.{EXPERT}: expected a divisor of the data-parallel degree {degrees['dp']} (ep "
                            f"of the dp ranks split each layer's experts), got {expert!r}. Change `parallel.{EXPERT}=` "
                            "on the command line.")
    return degrees | {REPLICATE: replicate, EXPERT: expert}


def world_size(cfg) -> int:
    """The ranks of a run: nodes x ranks per node."""
    return cfg["launch"]["nnodes"] * cfg["launch"]["nproc"]


def parallel_degrees(cfg) -> dict[str, int]:
    """The config's `parallel.*` resolved against its world size (a -1 inferred)."""
    return resolve_degrees(cfg["parallel"], world_size(cfg))


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    local_rank: int
    local_world_size: int
    device: str  # "cpu" or "cuda:<local_rank>"
    backend: str = "gloo"  # the process group's backend
    dp: int = 1
    tp: int = 1
    pp: int = 1
    dp_replicate: int = 1  # of dp: replicas of dp / dp_replicate sharded ranks (HSDP)
    cp: int = 1  # context-parallel ranks: each holds 1/cp of every sequence
    ep: int = 1  # of dp: the ranks that split each layer's experts (consecutive data-parallel ranks)
    _mesh: list = field(default_factory=list, repr=False, compare=False)  # built once, on first use
    _flat: dict = field(default_factory=dict, repr=False, compare=False)  # the mesh's flattened dims, by name

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise TopologyError(f"rank must be in [0, world_size={self.world_size}), got rank={self.rank}")
        if self.dp * self.cp * self.tp * self.pp != self.world_size:
            raise TopologyError(f"dp*cp*tp*pp must equal the world size: {self.dp}*{self.cp}*{self.tp}*{self.pp} "
                                f"!= {self.world_size}")
        if self.dp % self.dp_replicate:
            raise TopologyError(f"dp_replicate={self.dp_replicate} must divide dp={self.dp}")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.cp * self.tp * self.pp)

    @property
    def cp_rank(self) -> int:
        return (self.rank // (self.tp * self.pp)) % self.cp

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate

    @property
    def pp_rank(self) -> int:
        return (self.rank // self.tp) % self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def device_type(self) -> str:
        return "cuda" if self.device.startswith("cuda") else "cpu"

    def mesh(self):
        """The named ("dp", "pp", "tp") DeviceMesh over all ranks; index it by name for a sub-mesh. Under HSDP
        it is ("dp_replicate", "dp_shard", "pp", "tp"), with "dp" the two flattened. With context parallelism
        "cp" comes before "pp", and "dp_cp" (HSDP: "dp_shard_cp") flattens the ranks that hold the same
        parameters and see different tokens: FSDP shards over them, as torchtitan's mesh does."""
        if not self._mesh:
            from torch.distributed.device_mesh import init_device_mesh

            dims = {"dp": self.dp} if self.dp_replicate == 1 else {REPLICATE: self.dp_replicate,
                                                                     "dp_shard": self.dp_shard}
            dims |= ({CONTEXT: self.cp} if self.cp > 1 else {}) | {"pp": self.pp, "tp": self.tp}
            mesh = init_device_mesh(self.device_type, tuple(dims.values()), mesh_dim_names=tuple(dims))
            if self.dp_replicate > 1:
                self._flat["dp"] = mesh[REPLICATE, "dp_shard"]._flatten("dp")
            if self.cp > 1:
                self._flat["dp_cp"] = mesh[tuple(dims)[:-2]]._flatten("dp_cp")
            if self.cp > 1 and self.dp_replicate > 1:  # FSDP's 2-D mesh: the replicas x the ranks of one's shards
                self._flat["dp_replicate_shard_cp"] = self._flat["dp_cp"]._unflatten(
                    0, (self.dp_replicate, self.dp_shard * self.cp), (REPLICATE, "dp_shard_cp"))
            self._mesh.append(mesh)
            if self.ep > 1:  # made with the rest, before any fake mode (its rank tables are real tensors)
                self._flat[EXPERT] = self.submesh("dp")._unflatten(0, (self.dp // self.ep, self.ep),
                                                                  ("dp_mod_ep", EXPERT))
        return self._mesh[0]

    def expert_mesh(self):
        """The data-parallel ranks as (dp / ep, ep): "ep" the ranks that split each layer's experts, consecutive
        in dp; "dp_mod_ep" the ranks holding the same experts."""
        self.mesh()
        return self._flat[EXPERT]

    def submesh(self, name: str):
        """The mesh's dimension `name`, a flattened one too ("dp" under HSDP, "dp_cp"), kept as `mesh()` made
        it (torch deprecates slicing flattened dimensions from the root mesh)."""
        return self._flat.get(name) or self.mesh()[name]

    @classmethod
    def from_env(cls, device_kind: str, backend: str = "auto", degrees: dict | None = None) -> Topology:
        """Read torchrun's env:// variables (a plain process counts as a world of one); `degrees` are the
        resolved parallel degrees from the config (default: every rank a data-parallel replica)."""
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        degrees = {"dp": world_size, "tp": 1, "pp": 1} | dict(degrees or {})
        return cls(
            world_size=world_size,
            rank=int(os.environ.get("RANK", 0)),
            local_rank=local_rank,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
            device=f"cuda:{local_rank}" if device_kind == "cuda" else "cpu",
            backend=default_backend(device_kind) if backend == "auto" else backend,
            **degrees,
        )


def default_backend(device_kind: str) -> str:
    return "nccl" if device_kind == "cuda" else "gloo"
