"""The parallel layout (how many ways each kind of parallelism splits the work) and its one ``DeviceMesh``.

The mesh always has the four named dimensions ``("pp", "dp_replicate", "dp_shard", "tp")`` in that order (size-1
dimensions included), so every consumer slices the same names whatever the layout. Ranks that differ only in
``tp`` (and in ``pp``) see the same data; the data-parallel rank and degree come from the flattened
``dp_replicate x dp_shard`` dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..errors import UserError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


class LayoutError(UserError, ValueError):
    """The parallel layout does not fit the world size or the model; the message says which field."""


@dataclass
class ParallelDims:
    """Degrees of each parallelism. ``dp_shard=-1`` takes whatever the other degrees leave of ``world_size``."""

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "tp", "pp", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LayoutError(f"parallel.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.dp_shard, int) or isinstance(self.dp_shard, bool) or not (
                self.dp_shard == -1 or self.dp_shard >= 1):
            raise LayoutError(f"parallel.dp_shard must be a positive integer or -1 (fill), got {self.dp_shard!r}")
        others = self.dp_replicate * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise LayoutError(
                    f"world size {self.world_size} is not divisible by dp_replicate*tp*pp = {others}")
            self.dp_shard = self.world_size // others
        if others * self.dp_shard != self.world_size:
            raise LayoutError(
                f"dp_replicate ({self.dp_replicate}) * dp_shard ({self.dp_shard}) * tp ({self.tp}) * pp ({self.pp})"
                f" = {others * self.dp_shard}, but the world size is {self.world_size}")

    @classmethod
    def from_config(cls, parallel, world_size: int) -> ParallelDims:
        """From a config's ``[parallel]`` section (any object with the four attributes).

        When the degrees do not multiply to ``world_size`` and ``dp_shard`` is 1 (the default), ``dp_shard``
        takes the rest: the default config runs FSDP over every rank ``torchrun`` starts.
        """
        dp_shard = parallel.dp_shard
        if dp_shard == 1 and parallel.dp_replicate * parallel.tp * parallel.pp != world_size:
            dp_shard = -1
        return cls(dp_replicate=parallel.dp_replicate, dp_shard=dp_shard, tp=parallel.tp, pp=parallel.pp,
                   world_size=world_size)

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different slices of the global batch are processed at once."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP2 is used for any sharding and also whenever data parallelism meets TP or PP (HSDP-style)."""
        return self.dp_shard > 1 or (self.dp_replicate > 1 and (self.tp > 1 or self.pp > 1))

    @property
    def ddp_enabled(self) -> bool:
        return self.dp_replicate > 1 and not self.fsdp_enabled

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    def validate_model(self, args) -> None:
        """Check that the model's shapes split evenly under this layout (``args`` is a ``ModelArgs``)."""
        if self.tp > 1:
            for name, value in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads),
                                ("ffn hidden size", args.ffn_hidden_dim), ("vocab_size", args.vocab_size)):
                if value % self.tp:
                    raise LayoutError(f"parallel.tp = {self.tp} must divide the model's {name} ({value})")
        if self.pp > args.n_layers:
            raise LayoutError(f"parallel.pp = {self.pp} exceeds the model's n_layers ({args.n_layers})")

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """One 4-D mesh ``(pp, dp_replicate, dp_shard, tp)``; the flattened data-parallel mesh is kept as
        ``self.dp_mesh`` (its rank picks this rank's slice of the global batch)."""
        mesh = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp),
                                mesh_dim_names=MESH_DIMS)
        self.dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return mesh

    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (after ``build_mesh``; 0 without a mesh)."""
        mesh = getattr(self, "dp_mesh", None)
        return 0 if mesh is None else mesh.get_local_rank()
