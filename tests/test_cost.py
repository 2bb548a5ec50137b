"""The cost model against hand-computed figures (spec §2.5, §5): bench.pass_cost,
bench.roofline, bench.projection, bench.hardware and the `python -m bench.cost` CLI."""

import json
import subprocess
import sys

import pytest

from bench.drafter_cost import pass_speedup
from bench.hardware import DEVICES, get_device, measure_this_machine
from bench.pass_cost import (
    QUANTS,
    Matrix,
    decoder_cost,
    encoder_cost,
    expected_experts_hit,
    get_quant,
    kv_bytes_per_token,
    layer_weights,
    load_preset,
    param_counts,
)
from bench.projection import multi_canvas, multi_canvas_regimes
from bench.roofline import Schedule, estimate

MiB = 2**20


@pytest.fixture(scope="module")
def cfg():
    return load_preset("diffusiongemma-26b-a4b")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.cost", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- parameters (spec §2.5) ----------------------------------------------------------


def test_parameter_count_is_exact(cfg):
    pc = param_counts(cfg)
    assert pc.total == 25_250_986_812
    assert pc.embedding == 738_197_504
    assert pc.self_conditioning == 17_844_992
    # per layer, without the encoder's layer scalar (spec counts the decoder's only)
    sliding, full = layer_weights(cfg, 0), layer_weights(cfg, 5)
    assert sliding.numel() + sliding.vectors - 1 == 814_094_977
    assert full.numel() + full.vectors - 1 == 828_513_409
    assert pc.active_per_token == pytest.approx(3.084e9, rel=1e-3)
    assert pc.active_with_head == pytest.approx(3.82e9, rel=1e-3)


def test_tiny_inventory_matches_its_checkpoint():
    from mlx_diffgem.core.tiny import random_weights

    tiny = load_preset("tiny")
    numel = sum(w.size for w in random_weights(tiny).values())
    assert param_counts(tiny).total == numel


# -- decoder FLOPs (spec §5.2) -------------------------------------------------------


@pytest.mark.parametrize(
    "context, total, attention",
    [(512, 2.46, 0.113), (2048, 2.58, 0.231), (8192, 2.83, 0.488), (32768, 3.86, 1.52)],
)
def test_decoder_flops_match_spec(cfg, context, total, attention):
    d = decoder_cost(cfg, context)
    assert d.total_flops / 1e12 == pytest.approx(total, rel=0.01)
    assert d.flops["attention"] / 1e12 == pytest.approx(attention, rel=0.01)
    # 2 C (3.084 B + 17.8 M): layer matmuls + self-conditioning MLP
    layers = d.flops["layers"] + d.flops["sc_mlp"]
    assert layers / 1e12 == pytest.approx(1.588, rel=0.002)
    for head in ("lm_head", "soft_embedding"):  # 2 C V H each
        assert d.flops[head] == 2 * 256 * 262_144 * 2816


# -- decoder bytes -------------------------------------------------------------------


def test_every_expert_is_hit_by_a_canvas(cfg):
    p_idle = (1 - 8 / 128) ** 256
    assert p_idle == pytest.approx(7e-8, rel=0.1)
    hit = decoder_cost(cfg, 512).experts_hit_per_layer
    assert hit == pytest.approx(128 * (1 - p_idle), rel=1e-12)
    assert expected_experts_hit(1, 8, 128) == pytest.approx(8)
    assert 50 < expected_experts_hit(8, 8, 128) < 64  # fewer tokens, fewer experts


def test_weight_bytes_match_spec(cfg):
    d = decoder_cost(cfg, 512)
    # the whole 25.25 B-parameter model streamed once per step: 50.5 GB
    assert d.bytes["weights"] == pytest.approx(50.5e9, rel=0.005)
    # plus the embedding again for the soft embedding (1.48 GB) and the canvas rows
    assert d.bytes["embedding_reread"] == pytest.approx(1.48e9, rel=0.005)
    # sampler: 5 naive fp32 [256, 262144] passes of 268 MB
    assert d.bytes["sampler"] == 5 * 256 * 262_144 * 4


@pytest.mark.parametrize("context, mib", [(512, 110), (2048, 240), (8192, 360)])
def test_kv_read_matches_spec(cfg, context, mib):
    assert decoder_cost(cfg, context).bytes["kv_read"] / MiB == pytest.approx(
        mib, rel=0.002
    )


def test_kv_sizes_per_token(cfg):
    assert kv_bytes_per_token(cfg, 0) == 8 * 1024  # 8 heads x 256 x bf16, K and V
    assert kv_bytes_per_token(cfg, 5) == 4 * 1024  # 2 heads x 512 x bf16, K and V
    assert kv_bytes_per_token(cfg, 5, kv_shared=True) == 2 * 1024
    assert kv_bytes_per_token(cfg, 0, kv_shared=True) == 8 * 1024  # sliding: K != V
    shared = decoder_cost(cfg, 512, kv_shared=True).bytes["kv_read"]
    assert shared / MiB == pytest.approx(105)  # 100 sliding + 5 full


def test_quantized_weight_bytes(cfg):
    by = {q: decoder_cost(cfg, 512, quant=q).bytes["weights"] for q in QUANTS}
    assert 13.8e9 < by["4bit"] < 14.5e9  # "~14 GB at 4 bits incl. group scales"
    assert by["8bit"] == pytest.approx(by["bf16"] * 8.5 / 16, rel=0.001)
    assert by["4bit"] < by["mixed"] < by["8bit"]
    # one expert gate_up at 4 bits: 4 bits per weight + bf16 scale and bias per 64
    m = Matrix("experts", 1408, 2816)
    assert get_quant("4bit").matrix_bytes(m) == 1408 * (2816 / 2 + 44 * 4)
    assert get_quant("bf16").matrix_bytes(m) == 1408 * 2816 * 2


# -- encoder -------------------------------------------------------------------------


def test_encoder_commit(cfg):
    e = encoder_cost(cfg, 256, 512)
    assert set(e.flops) == {"layers", "attention"}  # no LM head, no self-conditioning
    assert e.flops["layers"] / 1e12 == pytest.approx(2 * 256 * 3.0836e9 / 1e12, 1e-3)
    # the stack without the embedding table: the "~49 GB" of spec §5.3
    assert e.bytes["weights"] == pytest.approx(50.50e9 - 1.476e9 - 0.036e9, rel=2e-3)
    # writes 256 tokens: 25 sliding x 8 KiB + 5 full x 4 KiB
    assert e.bytes["kv_write"] == 256 * (25 * 8 + 5 * 4) * 1024


def test_causal_attention_of_a_prefill():
    tiny = load_preset("tiny")  # W = 8, layers sliding/full/sliding/full
    e = encoder_cost(tiny, 13)
    nh = tiny.num_attention_heads
    keys_sliding = sum(min(8, q + 1) for q in range(13))
    keys_full = sum(q + 1 for q in range(13))
    want = 2 * 4 * nh * (8 * keys_sliding + 16 * keys_full)
    assert e.flops["attention"] == want


# -- roofline (spec §5.3) ------------------------------------------------------------


def test_h100_floor(cfg):
    h100 = get_device("H100")
    d, e = decoder_cost(cfg, 512), encoder_cost(cfg, 256, 512)
    assert d.bytes["weights"] / 3.35e12 * 1e3 == pytest.approx(15.07, rel=0.01)
    est = estimate(d, e, h100, Schedule(steps_per_canvas=15))
    assert est.step.bound == "memory"
    assert 15e-3 < est.step.floor_s < 17e-3  # "a well-implemented step is 15-17 ms"
    assert est.step.compute_s == pytest.approx(2.5e-3, rel=0.02)
    assert est.native_tokens_per_s == pytest.approx(1000, rel=0.05)
    assert est.weights_fit_in_memory


def test_speculative_beats_native_when_cheaper(cfg):
    d, e = decoder_cost(cfg, 512, quant="4bit"), encoder_cost(cfg, 256, 512)
    sched = Schedule(steps_per_canvas=30, target_passes=2, drafter_passes=10)
    est = estimate(d, e, get_device("M5 Max"), sched)
    passes = 2 + 10 * sched.drafter_cost
    ratio = est.speculative_tokens_per_s / est.native_tokens_per_s
    step, enc = est.step.floor_s, est.encoder.floor_s
    assert ratio == pytest.approx((30 * step + enc) / (passes * step + enc))
    assert ratio > 3


def test_measured_basis_falls_back_to_peak():
    m3 = get_device("M3 Max")  # no published measurement
    assert m3.rates("measured") == m3.rates("peak")
    h100 = get_device("H100 SXM")
    assert h100.rates("measured")[1] < h100.rates("peak")[1]


# -- hardware table ------------------------------------------------------------------


def test_hardware_table():
    names = set(DEVICES)
    for want in ("M1", "M2 Ultra", "M3 Ultra", "M4 Max", "M5 Max", "RTX 4090"):
        assert want in names
    assert {"RTX 5090", "H100 SXM", "H200", "DGX Spark"} <= names
    for dev in DEVICES.values():
        figs = [dev.memory_gb, dev.bandwidth_gbs, dev.matmul_tflops]
        figs += [
            f for f in (dev.measured_bandwidth_gbs, dev.measured_matmul_tflops) if f
        ]
        for f in figs:
            assert f.value > 0 and f.basis in ("datasheet", "measured") and f.source
    assert get_device("H100").bandwidth_gbs.value == 3350
    assert get_device("h200").measured_bandwidth_gbs.basis == "measured"
    assert "anchors.md" in get_device("m5-max").measured_matmul_tflops.source
    assert get_device("4090").name == "RTX 4090"


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown device 'Z80'.*H100 SXM"):
        get_device("Z80")
    with pytest.raises(ValueError, match=r"unknown preset 'nope'.*tiny"):
        load_preset("nope")
    with pytest.raises(ValueError, match="unknown quantization"):
        get_quant("3bit")


# -- CLI -----------------------------------------------------------------------------


def test_cli_json():
    r = _run_cli("--preset", "diffusiongemma-26b-a4b", "--context", "512", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    for key in (
        "flops_per_step",
        "weight_bytes_per_step",
        "kv_read_bytes_per_step",
        "sampler_bytes_per_step",
        "encoder",
        "devices",
        "params",
    ):
        assert key in rep
    assert rep["flops_per_step"] == pytest.approx(2.46e12, rel=0.01)
    assert rep["weight_bytes_per_step"] == pytest.approx(50.5e9, rel=0.005)
    assert set(DEVICES) == set(rep["devices"])
    assert "peak" in rep["devices"]["H100 SXM"]


def test_cli_options_and_errors():
    r = _run_cli(
        "--device", "H100", "--quant", "4bit", "--steps-per-canvas", "20", "--json"
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert list(rep["devices"]) == ["H100 SXM"] and rep["quant"] == "4bit"
    assert rep["schedule"]["steps_per_canvas"] == 20
    bad = _run_cli("--device", "Z80")
    assert bad.returncode == 2 and "known devices" in bad.stderr
    bad = _run_cli("--preset", "nope")
    assert bad.returncode == 2 and "known presets" in bad.stderr


def test_multi_canvas_pays_only_when_memory_bound(cfg):
    dev = DEVICES["H100 SXM"]
    # The released step streams ~52 GB of bf16 weights: memory-bound on an H100, so
    # a 2-canvas pass costs about one pass (weights once) and each canvas ~half.
    rows = multi_canvas(cfg, dev, quant="bf16", canvases=(2, 4))
    assert [r["canvases"] for r in rows] == [1, 2, 4]
    assert rows[0]["per_canvas_vs_single"] == 1.0
    assert rows[1]["bound"] == "memory" and 0.5 < rows[1]["per_canvas_vs_single"] < 0.6
    assert rows[2]["per_canvas_vs_single"] < rows[1]["per_canvas_vs_single"]
    # With bandwidth to spare every pass is compute-bound: FLOPs grow with the
    # canvases, so there is nothing to gain.
    fast = multi_canvas(cfg, dev, quant="bf16", canvases=(2,), bandwidth_gbs=1e9)
    assert fast[1]["bound"] == "compute"
    assert fast[1]["per_canvas_vs_single"] == pytest.approx(1.0, abs=1e-9)


def test_multi_canvas_regimes_and_cli(cfg):
    rows = {
        (r["device"], r["quant"], r["bandwidth"]): r for r in multi_canvas_regimes(cfg)
    }
    # M1 Ultra: bf16 compute-bound (no gain); a 4-bit MoE kernel's ~80 GB/s: a gain.
    assert rows["M1 Ultra", "bf16", "peak"]["per_canvas_vs_single"] == pytest.approx(1)
    assert rows["M1 Ultra", "4bit", "effective 4-bit MoE"]["per_canvas_vs_single"] < 0.7
    r = _run_cli("--multi-canvas", "2", "--device", "H100")
    assert r.returncode == 0 and "Verifying 2 canvases" in r.stdout
    bad = _run_cli("--multi-canvas", "1")
    assert bad.returncode == 2 and "--multi-canvas" in bad.stderr


def test_imports_neither_mlx_nor_torch():
    code = (
        "import sys, bench.cost, bench.pass_cost, bench.roofline, bench.hardware, "
        "bench.drafter_cost, bench.projection; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'torch')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


@pytest.mark.slow
def test_measure_this_machine():
    dev = measure_this_machine(repeats=2)
    assert dev.matmul_tflops.value > 0 and dev.bandwidth_gbs.value > 0
    r = _run_cli("--preset", "tiny", "--measure", "--device", "this-machine", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["measured"]["bandwidth_gbs"]["value"] > 0
    assert list(rep["devices"]) == ["this-machine"]


def test_pass_speedup_charges_drafter_passes_at_their_cost():
    assert pass_speedup(23.0, 2.0, 16.0, 0.5) == pytest.approx(23.0 / 10.0)
    # a free drafter: only the target's own passes count
    assert pass_speedup(24.0, 2.0, 16.0, 0.0) == pytest.approx(12.0)
    # the target drafting for itself gains only the passes it saves in total
    assert pass_speedup(20.0, 2.0, 18.0, 1.0) == pytest.approx(1.0)


# -- trained drafters: their own layers, the released design, the byte regimes ----


def _adapter(**kw):
    from drafter.trained import AdapterConfig

    return AdapterConfig(
        **{"hidden_size": 2816, "num_heads": 16, "head_dim": 256}, **kw
    )


def test_a_trained_drafters_own_layers_are_counted(cfg):
    """Each own layer: q, k, v, o and a gated MLP, and attention over the canvas."""
    from mlx_diffgem.core.plan import PassPlan

    plain = decoder_cost(cfg, 512, plan=PassPlan(layers=(0,)))
    a = _adapter(num_layers=2, intermediate_size=2112)
    own = decoder_cost(cfg, 512, plan=PassPlan(layers=(0,), adapter=a))
    assert "adapter" not in plain.flops and "adapter" not in plain.bytes
    T, H, inner, I = 256, 2816, 16 * 256, 2112
    matmul = 2 * T * (4 * H * inner + 3 * H * I)
    attention = 4 * 16 * 256 * T * 256
    assert own.flops["adapter"] == pytest.approx(2 * (matmul + attention))
    assert own.bytes["adapter"] == pytest.approx(
        2 * (2 * (4 * H * inner + 3 * H * I) + 4 * H)
    )
    assert own.total_bytes - plain.total_bytes == pytest.approx(own.bytes["adapter"])


def test_a_trained_drafter_maps_onto_the_released_shape(cfg):
    """Same layers and cuts, the head at the same vocabulary share, own layers at the
    released width; a layer of another kind there is refused."""
    from bench.drafter_cost import released_plan
    from drafter.trained import AdapterConfig
    from mlx_diffgem.core.config import ModelConfig
    from mlx_diffgem.core.plan import PassPlan
    from mlx_diffgem.core.tiny import tiny_config_dict

    raw = tiny_config_dict()["text_config"]
    raw["num_hidden_layers"], raw["vocab_size"] = 6, 4096
    raw["layer_types"] = ["sliding_attention"] * 5 + ["full_attention"]
    src = ModelConfig.from_dict(raw)
    small = AdapterConfig(hidden_size=raw["hidden_size"], num_layers=2, num_heads=2)
    plan = PassPlan(
        layers=(0, 1, 5), top_k=1, sc_top_k=32, head_vocab=1024, adapter=small
    )
    there = released_plan(plan, src, cfg)
    assert there.layers == (0, 1, 5) and there.top_k == 1 and there.sc_top_k == 32
    assert there.head_vocab == cfg.vocab_size // 4
    assert (there.adapter.hidden_size, there.adapter.num_layers) == (2816, 2)
    assert there.adapter.intermediate_size == cfg.intermediate_size
    raw["layer_types"] = ["sliding_attention"] * 4 + ["full_attention"] * 2
    other = ModelConfig.from_dict(raw)
    with pytest.raises(ValueError, match=r"layers \[4\]: no layer of the same kind"):
        released_plan(PassPlan(layers=(0, 4), adapter=small), other, cfg)


def test_byte_regimes_charge_each_pass_its_bytes(cfg):
    """Native passes at a target pass each; a hidden verify (2C slots) costs a bit
    more than one pass where weights dominate; drafter passes at their byte share."""
    from bench.drafter_cost import byte_regime
    from mlx_diffgem.core.plan import PassPlan

    plan = PassPlan(layers=(0, 5), sc_top_k=32, head_vocab=65536)
    same = {"native_target": 20.0, "spec_target": 20.0, "verifies": 0.0, "drafter": 0}
    r = byte_regime(cfg, plan, same)
    assert r["mac-4bit"]["native_over_spec"] == pytest.approx(1.0)
    passes = {"native_target": 20.0, "spec_target": 3.0, "verifies": 2.0, "drafter": 10}
    r = byte_regime(cfg, plan, passes)
    for regime in ("mac-4bit", "h200-bf16"):
        d = r[regime]
        assert 1.0 < d["verify_pass_ratio"] < 1.2
        assert 0.0 < d["drafter_pass_ratio"] < 0.15
        want = 1 + 2 * d["verify_pass_ratio"] + 10 * d["drafter_pass_ratio"]
        assert d["spec_pass_equivalents"] == pytest.approx(want)
        assert d["native_over_spec"] == pytest.approx(20 / want)
    plain = byte_regime(cfg, plan, passes, hidden=False)
    assert plain["h200-bf16"]["verify_pass_ratio"] == pytest.approx(1.0)
