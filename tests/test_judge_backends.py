"""The judge-backend registry: every entry names an actor class that serves the judge contract."""

import inspect

import pytest

from actors.judges import JUDGE_BACKENDS, judge_backend
from actors.judges.protocol import JudgeBackend


def test_an_unknown_backend_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"judge.backend='oracle' is not one of: policy"):
        judge_backend("oracle")


@pytest.mark.parametrize("name", list(JUDGE_BACKENDS))
def test_every_backend_serves_the_contract(name):
    entry = judge_backend(name)
    cls = entry.actor_class()
    for member in ("judge", "meta_judge"):
        wanted = list(inspect.signature(getattr(JudgeBackend, member)).parameters)
        assert list(inspect.signature(getattr(cls, member)).parameters)[: len(wanted)] == wanted
    assert hasattr(cls, "can_meta_judge")
    # Pools with a local engine are engine hosts: restartable, refit-able, health-checked like generators.
    assert not entry.local_engine or {"load_weights", "weight_version", "ping"} <= set(dir(cls))


def test_the_policy_judge_follows_the_policy_and_can_meta_judge():
    entry = judge_backend("policy")
    assert entry.follows_policy and entry.local_engine and entry.can_meta_judge
