"""Ray worker groups: N actors of one worker class on the bundles of one placement group."""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class WorkerGroup:
    """`call` runs a method on every rank with the same arguments; `call_shards` gives rank i shard i.
    A bundle is one device (GPU) or one CPU worker; workers take the whole bundle, so nothing starves."""

    def __init__(self, cls: type, kwargs_per_rank: list[dict[str, Any]], use_gpu: bool, name: str):
        self.name = name
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in kwargs_per_rank], strategy="PACK")
        ray.get(self.pg.ready(), timeout=300)
        remote = ray.remote(cls)
        self.workers = [
            remote.options(num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=0, name=f"{name}_{rank}_{id(self)}",
                           scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)
                           ).remote(**kw)
            for rank, kw in enumerate(kwargs_per_rank)
        ]

    def __len__(self) -> int:
        return len(self.workers)

    def call(self, method: str, *args, **kwargs) -> list:
        return ray.get([getattr(w, method).remote(*args, **kwargs) for w in self.workers])

    def call_rank0(self, method: str, *args, **kwargs):
        return ray.get(getattr(self.workers[0], method).remote(*args, **kwargs))

    def call_shards(self, method: str, shards: list, *args, **kwargs) -> list:
        return ray.get([getattr(w, method).remote(s, *args, **kwargs) for w, s in zip(self.workers, shards)])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        remove_placement_group(self.pg)


def mean_metrics(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Per-worker metric dicts -> each key's mean over the workers that report it."""
    keys = set().union(*dicts)
    return {k: sum(d[k] for d in dicts if k in d) / sum(k in d for d in dicts) for k in keys}
