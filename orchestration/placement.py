"""Placement: each pool reserves its own resources in a Ray placement group, one bundle per replica.

Generators, judges and learner workers therefore never share a GPU by accident, and a layout the cluster
cannot hold fails at start-up with the numbers (requested against what the cluster has) instead of leaving
actors pending forever.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import ClusterConfig, ConfigError


class PlacementError(ConfigError):
    """The cluster cannot hold the pools as configured (a configuration error: exit code 2)."""


@dataclass(frozen=True)
class PoolRequest:
    name: str  # the config key, e.g. "cluster.generators"
    count: int  # replicas (or learner workers)
    num_cpus: float
    num_gpus: float
    strategy: str
    custom: tuple[tuple[str, float], ...] = ()  # custom Ray resources per bundle (node-group pins)

    @property
    def bundle(self) -> dict[str, float]:
        b = {"CPU": self.num_cpus, **dict(self.custom)}
        if self.num_gpus:
            b["GPU"] = self.num_gpus
        return b

    def describe(self) -> str:
        extra = "".join(f", {v:g} {k}" for k, v in self.custom)
        return f"{self.name}: {self.count} x ({self.num_cpus:g} CPU, {self.num_gpus:g} GPU{extra}), {self.strategy}"


def requests(cluster: ClusterConfig, *, judges: bool, learner: bool,
             engine_ranks: dict[str, int] | None = None) -> list[PoolRequest]:
    """`engine_ranks`: pool key -> ranks per replica of an engine whose ranks are Ray actors of their own
    (trtllm): such a replica gets that many consecutive bundles, its GPUs split one share per bundle."""
    ranks = engine_ranks or {}

    def request(key: str, pool, count: int) -> PoolRequest:
        r = ranks.get(key, 1)
        return PoolRequest(key, count * r, pool.num_cpus, pool.num_gpus / r, pool.strategy,
                           tuple(sorted((pool.resources or {}).items())))

    out = [request("cluster.generators", cluster.generators, cluster.generators.replicas)]
    if judges:
        out.append(request("cluster.judges", cluster.judges, cluster.judges.replicas))
    if learner:
        out.append(request("cluster.learner", cluster.learner, cluster.learner.workers))
    return out


def check_fits(pools: list[PoolRequest], totals: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """Fail with numbers when the pools need more than the cluster has (in all, or on any one node)."""
    layout = "; ".join(p.describe() for p in pools)
    for resource in sorted({"CPU", "GPU"} | {k for p in pools for k, _ in p.custom}):
        need = sum(p.count * p.bundle.get(resource, 0) for p in pools)
        have = totals.get(resource, 0)
        if need > have:
            raise PlacementError(f"the pools need {need:g} {resource} but the cluster has {have:g} ({layout}). "
                                 "Lower replicas/workers or what each asks for, or add nodes "
                                 "(with an autoscaler: cluster.wait_for_autoscaler=true)")
    for p in pools:
        fits_somewhere = any(all(node.get(r, 0) >= v for r, v in p.bundle.items()) for node in nodes)
        if not fits_somewhere:
            biggest = max((node.get("GPU", 0) for node in nodes), default=0)
            raise PlacementError(f"{p.name}: one replica needs {p.bundle} but no node has that much "
                                 f"(largest node: {biggest:g} GPU)")
        if p.strategy == "STRICT_PACK":
            one_node = {r: v * p.count for r, v in p.bundle.items()}
            if not any(all(node.get(r, 0) >= v for r, v in one_node.items()) for node in nodes):
                raise PlacementError(f"{p.name} with strategy STRICT_PACK needs {one_node} on one node; no node "
                                     "has that much (use PACK or SPREAD)")


def cluster_capacity() -> tuple[dict[str, float], list[dict[str, float]]]:
    totals = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return totals, nodes


def reserve(pool: PoolRequest, timeout_s: float):
    """A ready placement group for `pool`, or PlacementError after `timeout_s`."""
    pg = placement_group([pool.bundle] * pool.count, strategy=pool.strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        available = ray.available_resources()
        raise PlacementError(f"{pool.describe()} could not be placed within {timeout_s:.0f}s "
                             f"(cluster.placement_timeout_s); available now: CPU {available.get('CPU', 0):g}, "
                             f"GPU {available.get('GPU', 0):g}")
    return pg


def in_bundle(pg, index: int, capture_children: bool = False) -> PlacementGroupSchedulingStrategy:
    """`capture_children`: the actor's own tasks and actors (an engine's rank workers) stay in `pg` too."""
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index,
                                            placement_group_capture_child_tasks=capture_children)


def release(groups: list) -> None:
    for pg in groups:
        remove_placement_group(pg)
