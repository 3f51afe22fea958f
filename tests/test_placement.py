"""Placement: each pool's bundles, and layouts the cluster cannot hold fail at once with the numbers."""

import pytest

from orchestration.config import load_config
from orchestration.placement import PlacementError, PoolRequest, check_fits, requests

NODE_8GPU = {"CPU": 64, "GPU": 8}


def pools(*overrides, judges=True, learner=True):
    return requests(load_config(list(overrides)).cluster, judges=judges, learner=learner)


def test_one_bundle_per_replica_with_custom_resources():
    wanted = pools("cluster.generators.replicas=3", "cluster.generators.num_gpus=1",
                   "cluster.generators.resources={selfreward_generators:1}", "cluster.learner.strategy=STRICT_PACK")
    gen, judge, learner = wanted
    assert (gen.count, gen.bundle) == (3, {"CPU": 1.0, "GPU": 1.0, "selfreward_generators": 1.0})
    assert judge.bundle == {"CPU": 1.0}  # no GPU key when none is asked for
    assert learner.strategy == "STRICT_PACK" and learner.count == 2
    assert [p.name for p in pools(judges=False, learner=False)] == ["cluster.generators"]


def test_too_many_gpus_names_the_numbers():
    wanted = pools("cluster.generators.replicas=4", "cluster.generators.num_gpus=1", "cluster.judges.num_gpus=2",
                   "cluster.learner.num_gpus=2")
    with pytest.raises(PlacementError, match=r"need 10 GPU but the cluster has 8 .*cluster.generators: 4 x"):
        check_fits(wanted, NODE_8GPU, [NODE_8GPU])


def test_a_replica_bigger_than_any_node_fails():
    wanted = [PoolRequest("cluster.learner", 1, 1, 16, "PACK")]
    with pytest.raises(PlacementError, match="cluster.learner: one replica needs .*'GPU': 16.*largest node: 8 GPU"):
        check_fits(wanted, {"CPU": 128, "GPU": 16}, [NODE_8GPU, NODE_8GPU])


def test_strict_pack_must_fit_one_node():
    wanted = [PoolRequest("cluster.learner", 4, 1, 4, "STRICT_PACK")]
    with pytest.raises(PlacementError, match="STRICT_PACK needs .*on one node"):
        check_fits(wanted, {"CPU": 128, "GPU": 16}, [NODE_8GPU, NODE_8GPU])
    check_fits([PoolRequest("cluster.learner", 4, 1, 4, "PACK")], {"CPU": 128, "GPU": 16}, [NODE_8GPU, NODE_8GPU])


def test_missing_custom_resource_fails():
    wanted = [PoolRequest("cluster.judges", 2, 1, 1, "PACK", (("selfreward_judges", 1.0),))]
    with pytest.raises(PlacementError, match="need 2 selfreward_judges but the cluster has 0"):
        check_fits(wanted, NODE_8GPU, [NODE_8GPU])
