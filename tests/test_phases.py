"""The sampler's three phases, each on its own: the model call (what is fed, when the cache refreshes), the
proposal (tokens and confidences from a step's outputs) and the commit rule (how many tokens, when a block ends)."""

from __future__ import annotations

import numpy as np
import pytest

from llada_onnx.runtime.model_calls import CachedForward, FullForward
from llada_onnx.runtime.noise import Noise
from llada_onnx.runtime.policies import Factor, Scheduled, Threshold, commit_rule
from llada_onnx.runtime.proposal import LLaDAProposal, softmax_at
from llada_onnx.runtime.contract import StepOutput
from llada_onnx.runtime.settings import SamplerSettings

from vectors import RuleGraph

EOS, EOT = 126081, 126348


# ------------------------------------------------------------------------------------------------ model calls
def test_full_forward_feeds_the_canvas_and_times_itself():
    graph = RuleGraph()
    canvas = np.full((2, 6), 126336)
    out = FullForward(graph)(canvas, np.ones_like(canvas), np.array([[4, 5], [4, 5]]), step=0, window_start=4,
                             block_end=6, logits=True)
    assert graph.calls == [((2, 6), (2, 2), True)] and out.logits.shape[:2] == (2, 2)


class FakeCache:
    def __init__(self):
        self.calls = []

    def refresh(self, canvas, mask, window, *, logits):
        self.calls.append(("refresh", canvas.shape[1]))
        return StepOutput(window * 0, window * 0.0, None), ["kv"]

    def step(self, canvas, mask, fed_start, fed_end, window, kv, *, logits):
        assert kv == ["kv"]
        self.calls.append(("step", fed_start, fed_end))
        return StepOutput(window * 0, window * 0.0, None)


@pytest.mark.parametrize("mode,refresh_every,fed_end", [("dual", None, 8), ("prefix", None, 12), ("dual", 2, 8)])
def test_cached_forward_owns_its_refresh_cadence_and_fed_range(mode, refresh_every, fed_end):
    cache = FakeCache()
    call = CachedForward(cache, mode, refresh_every)
    canvas = np.zeros((1, 12), dtype=np.int64)
    for step in range(4):
        call(canvas, np.ones_like(canvas), np.array([[5]]), step=step, window_start=5, block_end=8, logits=False)
    refresh = [step == 0 or (refresh_every and step % refresh_every == 0) for step in range(4)]
    assert cache.calls == [("refresh", 12) if r else ("step", 5, fed_end) for r in refresh]


# ------------------------------------------------------------------------------------------------ proposal
def proposal(noise=None, **settings):
    s = SamplerSettings(gen_length=4, block_length=4, steps=4, **settings)
    return LLaDAProposal(s, noise or Noise.of(), batch=1, eos_id=EOS, eot_id=EOT)


def logits_of(values: dict[int, float], count: int = 2) -> np.ndarray:
    logits = np.zeros((1, count, 126464), dtype=np.float32)
    for token, value in values.items():
        logits[..., token] = value
    return logits


def test_greedy_proposal_is_the_graphs_summaries():
    p = proposal()
    out = StepOutput(np.array([[7, 9]]), np.array([[0.5, 0.25]], dtype=np.float32), None)
    x0, confidence = p(out, np.array([[0, 1]]), 2)
    assert not p.needs_logits and x0.tolist() == [[7, 9]] and confidence.tolist() == [[0.5, 0.25]]


def test_eos_options_act_on_the_logits():
    logits = logits_of({EOS: 9.0, 5: 8.0})
    p = proposal(logits_eos_inf=True)
    x0, _ = p(StepOutput(None, None, logits.copy()), np.array([[0, 1]]), 2)
    assert p.needs_logits and x0.tolist() == [[5, 5]]  # EOS is never sampled
    x0, confidence = proposal(confidence_eos_eot_inf=True)(StepOutput(None, None, logits.copy()),
                                                            np.array([[0, 1]]), 2)
    assert x0.tolist() == [[EOS, EOS]] and confidence.tolist() == [[0.0, 0.0]]  # chosen, but never committed first


def test_cfg_combines_conditional_and_unconditional_rows():
    p = LLaDAProposal(SamplerSettings(gen_length=4, cfg_scale=1.0), Noise.of(), batch=1, eos_id=EOS, eot_id=EOT)
    cond, uncond = logits_of({3: 2.0, 4: 1.5}), logits_of({3: 2.0, 4: 0.0})
    x0, confidence = p(StepOutput(None, None, np.concatenate([cond, uncond])), np.array([[0, 1]]), 2)
    # uncond + 2 * (cond - uncond): token 4 scores 3.0 against token 3's 2.0
    assert x0.tolist() == [[4, 4]]
    np.testing.assert_allclose(confidence, softmax_at(2 * cond - uncond, x0))


def test_noise_is_drawn_over_the_window_then_reordered():
    drawn = []

    def uniforms(shape, dtype):
        drawn.append((shape, np.dtype(dtype)))
        return np.arange(np.prod(shape), dtype=dtype).reshape(shape) / np.prod(shape)

    p = proposal(noise=Noise.of(uniforms), remasking="random")
    out = StepOutput(np.array([[1, 2]]), np.array([[0.9, 0.8]], dtype=np.float32), None)
    _, confidence = p(out, np.array([[3, 1]]), 4)  # predicted: window columns 3 and 1 of a 4-wide window
    assert drawn == [((1, 4), np.dtype(np.float32))]
    assert confidence.tolist() == [[0.75, 0.25]]


# ------------------------------------------------------------------------------------------------ commit rules
def test_scheduled_rule_splits_each_block_over_its_steps():
    rule = commit_rule(SamplerSettings(gen_length=8, block_length=4, steps=6))
    assert isinstance(rule, Scheduled) and rule.total_steps == 6
    rule.start_block(np.array([4, 2]))
    assert [rule.count(0, i, np.ones(4)) for i in range(3)] == [2, 1, 1]
    assert [rule.count(1, i, np.ones(2)) for i in range(3)] == [1, 1, 0]
    assert [rule.block_done(i, True) for i in range(4)] == [False, False, False, True]


def test_parallel_rules_commit_at_least_one_and_run_until_filled():
    conf = np.array([0.95, 0.91, 0.5, 0.1])
    threshold = commit_rule(SamplerSettings(threshold=0.9))
    factor = commit_rule(SamplerSettings(factor=1.0))
    assert isinstance(threshold, Threshold) and isinstance(factor, Factor) and threshold.total_steps is None
    assert threshold.count(0, 0, conf) == 2 and threshold.count(0, 0, np.array([0.2])) == 1
    assert factor.count(0, 0, conf) == 2  # (2+1)*(1-0.91) = 0.27 < 1; (3+1)*(1-0.5) = 2 >= 1
    assert threshold.block_done(50, masks_left=True) is False and threshold.block_done(1, masks_left=False)


def test_a_hand_built_pipeline_opens_its_cache_graph_like_its_forward_graph(tiny_cache_onnx):
    """The KV-cache session follows the forward session's provider, device and options, however the Pipeline was
    built (on CUDA: a hand-built Pipeline(GraphSession(m, "cuda")) gets a CUDA cache session)."""
    from llada_onnx.runtime import GraphSession, Manifest, Pipeline

    pipe = Pipeline(GraphSession(Manifest.load(tiny_cache_onnx), "cpu", threads=1))
    assert pipe.kv_cache.provider == pipe.graph.provider
    assert pipe.kv_cache.session.get_session_options().intra_op_num_threads == 1
