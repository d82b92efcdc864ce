"""The GPU launch path (autotuned config lists) exercised under the interpreter with a stand-in benchmark.

On a GPU every kernel with several configs goes through ``triton.autotune``; without one the suite would only ever
run each list's first config. Here the autotuner runs for real (grids from config meta-parameters, key names,
per-dtype lists, clamped tiles) with a fake timer that makes the *last* config win, so the configs other than the
safe one are the ones that produce the results compared with the naive recurrence.
"""

import functools

import pytest
import triton

from hf_fwp.modeling import ops_triton_common as triton_common
from hf_fwp.modeling.ops_delta_rule_reference import naive_delta_rule
from hf_fwp.modeling.ops_delta_rule_triton import triton_chunk_delta_rule
from hf_fwp.modeling.ops_linear_attn_reference import naive_linear_attention
from hf_fwp.modeling.ops_linear_attn_triton import chunk_triton_linear_attention
from tests.conftest import DEVICE
from tests.ops.helpers import assert_close, make_inputs, run

pytestmark = pytest.mark.triton


@pytest.fixture
def autotuned(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("on a GPU the real autotuner runs in every Triton test")
    calls = []

    def fake_bench(fn, quantiles=None):
        calls.append(1)
        fn()
        t = 1.0 / len(calls)  # later configs look faster: the last candidate wins
        return [t, t, t] if quantiles else t

    monkeypatch.setattr(triton_common, "autotune_enabled", lambda: True)
    monkeypatch.setattr(triton_common, "_TUNERS", {})
    monkeypatch.setattr(triton_common.triton, "autotune", functools.partial(triton.autotune, do_bench=fake_bench))
    return calls


@pytest.mark.parametrize("gate", [None, "strong"])
def test_autotuned_launches_match_naive(autotuned, gate):
    x = make_inputs(1, 70, 2, 16, 80, gate=gate, beta_max=2.0, initial_state=True, device=DEVICE, seed=12)
    assert_close(run(triton_chunk_delta_rule, x), run(naive_delta_rule, x), 1e-4, "delta")
    x.pop("beta")
    assert_close(run(chunk_triton_linear_attention, x), run(naive_linear_attention, x), 1e-4, "linear")
    assert len(autotuned) > 20  # every multi-config kernel was benchmarked
