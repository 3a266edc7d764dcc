"""`LearnerGroup`: the driver's one handle on N learner actors that form one FSDP2 group.

Contract:
* `LearnerGroup.create(actor_cls, bundles=, options=, args=, kwargs=)` finds a
  rendezvous address on rank 0's bundle (`process_group.rendezvous`, run as a
  zero-CPU task in that bundle), then starts one actor per bundle with
  `rank`, `world_size`, `master_addr`, `master_port` added to its kwargs.
  The actors join one torch.distributed group in their constructors.
* it quacks like one actor handle: `group.method.remote(*args, **kwargs)`
  calls `method` on every rank with the same arguments (each argument is put
  into the object store once and shared) and returns ONE ObjectRef, which
  resolves to rank 0's result after every rank has finished, or raises the
  first rank's error. Every learner method is collective (a sharded forward,
  weight gathering, a DCP checkpoint), so calling a subset of ranks would hang;
  the group never does.
* `group.actors` are the handles (rank order), e.g. for `ray.kill`.
* A group of 1 is allowed (it still goes through the process group).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

__all__ = ["LearnerGroup"]


def _first(*results: Any) -> Any:
    return results[0]


class _FanOut:
    def __init__(self, group: "LearnerGroup", name: str) -> None:
        self.group, self.name = group, name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        import ray

        def share(v: Any) -> Any:
            return v if isinstance(v, ray.ObjectRef) else ray.put(v)

        args = tuple(share(a) for a in args)
        kwargs = {k: share(v) for k, v in kwargs.items()}
        refs = [getattr(actor, self.name).remote(*args, **kwargs) for actor in self.group.actors]
        if len(refs) == 1:
            return refs[0]
        return self.group._first.remote(*refs)  # resolves only when every rank has returned


class LearnerGroup:
    def __init__(self, actors: Sequence[Any]) -> None:
        import ray

        if not actors:
            raise ValueError("LearnerGroup needs at least one actor")
        self.actors = list(actors)
        self._first = ray.remote(num_cpus=0)(_first)

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def __getattr__(self, name: str) -> _FanOut:
        if name.startswith("_"):
            raise AttributeError(name)
        return _FanOut(self, name)

    @classmethod
    def create(
        cls,
        actor_cls: Any,
        *,
        bundles: Sequence[Any],
        options: Callable[[Any], dict[str, Any]],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> "LearnerGroup":
        """Start `len(bundles)` ranks of `actor_cls` (a ray.remote class); `options(bundle)` gives each its
        `.options(...)` (resources, placement)."""
        import ray

        from tepo_ray.distributed.process_group import rendezvous

        opts0 = options(bundles[0])
        where = {k: v for k, v in opts0.items() if k == "scheduling_strategy"}
        addr, port = ray.get(ray.remote(num_cpus=0)(rendezvous).options(**where).remote())
        world = len(bundles)
        actors = [
            actor_cls.options(**options(b)).remote(
                *args, **dict(kwargs or {}), rank=rank, world_size=world, master_addr=addr, master_port=port)
            for rank, b in enumerate(bundles)
        ]
        return cls(actors)
