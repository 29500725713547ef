"""The simulated world's step time: model shapes, what makes an instance the straggler, what CP costs, and the
router's cost model derived from the same numbers."""

from __future__ import annotations

import pytest

from nanocp.sim.hardware import DEVICES, LINKS
from nanocp.sim.shapes import SHAPES
from nanocp.sim.steptime import Coefficients, StepModel, straggler_ratio

QWEN = SHAPES["qwen3-30b-a3b"]


def model(link: str = "nvlink", n: int = 4, **coefficients: float) -> StepModel:
    return StepModel(QWEN, DEVICES["h100"], LINKS[link], Coefficients(**coefficients), n)


def test_shapes_have_the_published_kv_and_weight_sizes() -> None:
    assert QWEN.kv_bytes_per_token == 48 * 2 * 4 * 128 * 2  # 98 KB: K and V, 4 KV heads of 128, bf16
    assert SHAPES["qwen3-235b-a22b"].kv_bytes_per_token == 94 * 2 * 4 * 128 * 2
    assert SHAPES["deepseek-v3"].kv_bytes_per_token == 61 * (512 + 64) * 2  # the MLA latent and rope key
    # Qwen3-30B-A3B holds about 61 GB of bf16 weights; an instance of 8 keeps a sixteenth of the experts' 58 GB.
    assert QWEN.weight_bytes_per_instance(1) == pytest.approx(61.1e9, rel=0.01)
    assert QWEN.weight_bytes_per_instance(8) == pytest.approx(61.1e9 - 58.0e9 * 7 / 8, rel=0.02)


def test_the_instance_with_the_most_kv_paces_the_group() -> None:
    m = model()
    balanced = m.step([8, 8, 8, 8], [40_000] * 4, [0] * 4)
    skewed = m.step([8, 8, 8, 8], [100_000, 20_000, 20_000, 20_000], [0] * 4)
    assert skewed.step_s > balanced.step_s
    assert max(skewed.own_s) == skewed.own_s[0]
    assert straggler_ratio(skewed.own_s) > straggler_ratio(balanced.own_s) >= 1.0


def test_a_larger_home_batch_costs_more_and_expert_work_is_the_groups() -> None:
    m = model(token_s=1e-4)
    times = m.step([32, 0, 0, 0], [0] * 4, [0] * 4)
    assert times.own_s[0] > times.own_s[1] == times.own_s[2] > 0, "idle instances still run their experts"


def test_a_cp_route_costs_its_latency_once_a_layer_however_many_rows_and_bytes_per_row() -> None:
    for link in ("nvlink", "infiniband"):
        m = model(link)
        none = m.step([4] * 4, [10_000] * 4, [0] * 4).step_s
        one = m.step([4] * 4, [10_000] * 4, [1, 1, 0, 0]).step_s
        many = m.step([4] * 4, [10_000] * 4, [50, 50, 0, 0]).step_s
        latency = 2 * QWEN.layers * LINKS[link].p2p_latency_s
        assert one - none > latency
        assert many - one == pytest.approx(49 * QWEN.layers * QWEN.cp_row_bytes / LINKS[link].bytes_per_s, rel=1e-6)
    assert (
        model("infiniband").step([4] * 4, [0] * 4, [1, 1, 0, 0]).step_s
        > model().step([4] * 4, [0] * 4, [1, 1, 0, 0]).step_s
    )


def test_the_routers_cost_model_charges_kv_tokens_and_the_cp_routes_latency_as_the_world_does() -> None:
    m = model("infiniband")
    cost = m.router_cost()
    assert cost.kv_token_ms == pytest.approx(1e3 * QWEN.kv_bytes_per_token / DEVICES["h100"].copy_bytes_per_s)
    assert cost.cp_step_ms > 2 * QWEN.layers * LINKS["infiniband"].p2p_latency_s * 1e3
    assert model("nvlink").router_cost().cp_step_ms < cost.cp_step_ms
