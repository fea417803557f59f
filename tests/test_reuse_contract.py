"""The written contract between the sampler and a cache policy (magi1.sampling.reuse_contract): cache_core
fulfils it without importing magi1, and in magi1 only magi1.sampling.reuse talks to a policy's state."""

import ast
import inspect
from pathlib import Path

import pytest
import torch

from cache_core import CachePolicy, CacheState, Decision
from magi1.sampling import reuse_contract
from magi1.sampling.reuse_contract import ReuseDecision, ReusePolicy, ReuseState

ROOT = Path(__file__).resolve().parents[1]


def protocol_methods(protocol):
    return {name: value for name, value in vars(protocol).items()
            if callable(value) and not name.startswith("_")}


@pytest.mark.parametrize("protocol, implementation", [(ReusePolicy, CachePolicy), (ReuseState, CacheState)])
def test_every_method_of_the_contract_exists_with_its_parameters(protocol, implementation):
    methods = protocol_methods(protocol)
    assert methods, protocol
    for name, stated in methods.items():
        implemented = getattr(implementation, name)
        assert callable(implemented), name
        assert list(inspect.signature(implemented).parameters) == list(inspect.signature(stated).parameters), name


def test_a_policy_its_state_and_its_decisions_satisfy_the_protocols():
    for policy in (CachePolicy(), CachePolicy(mode="flowcache"), CachePolicy(mode="off")):
        assert isinstance(policy, ReusePolicy)
        state = policy.new_state(num_steps=3, chunk_shape=(4, 2, 4, 4), patch=(2, 2))
        assert isinstance(state, ReuseState)
    policy = CachePolicy(mode="motion", proxy="latent", tau=0.3, warmup_steps=1, chunk_wise_steps=0,
                         final_full_steps=0)
    state = policy.new_state(num_steps=4, chunk_shape=(1, 2, 2, 6), patch=(2, 2))
    latent = torch.zeros(1, 2, 2, 6)
    latent[0, 1, :, 4:] = 1.0
    feature = torch.ones(3)
    seen = {}
    for k in range(4):
        (decision,) = state.decide([(0, k, feature)])
        feature = feature * 1.2
        assert isinstance(decision, ReuseDecision)
        seen[decision.action] = decision
        v = state.velocity(decision, torch.ones(1, 2, 2, 6), 0.1)
        state.observe([(0, k, latent, v, 0.1 * (k + 1))])
    assert seen["dense"].active is None and seen["dense"].n_active == seen["dense"].n_tokens
    assert set(seen) >= {"dense", "sparse"}, seen
    sparse = seen["sparse"]
    assert sparse.active.dtype == torch.int64 and sparse.active.numel() == sparse.n_active
    assert 0 not in state._chunks  # the last step's observation forgot the chunk


def test_a_skip_decision_lists_no_token():
    decision = Decision(3, 2, "chunk", 0, 6, torch.empty(0, dtype=torch.long))
    assert decision.action == "skip" and isinstance(decision, ReuseDecision)
    assert Decision(3, 2, "token", 6, 6).action == "dense"
    assert Decision(3, 2, "token", 2, 6, torch.tensor([1, 4])).action == "sparse"


def test_something_that_is_no_policy_is_refused_by_the_sampler():
    assert not isinstance(object(), ReusePolicy)
    assert not isinstance(reuse_contract, ReusePolicy)


STATE_CALLS = {"decide", "velocity", "observe", "new_state"}


def test_only_magi1_reuse_talks_to_a_policy_state():
    """Calls of the contract's methods on a policy or a state appear in magi1/sampling/reuse.py alone."""
    callers = set()
    for path in sorted((ROOT / "magi1").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in STATE_CALLS
                    and any(word in ast.unparse(node.func.value) for word in ("policy", "state"))):
                callers.add(path.relative_to(ROOT).as_posix())
    assert callers == {"magi1/sampling/reuse.py"}


def test_cache_core_does_not_import_magi1_and_magi1_does_not_import_cache_core():
    for package, other in (("cache_core", "magi1"), ("magi1", "cache_core")):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [("." * node.level) + (node.module or "")]
                for name in names:
                    assert other not in name.split("."), f"{path} imports {name}"
