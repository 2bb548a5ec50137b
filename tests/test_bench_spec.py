"""The speculative-decoding benchmarks: the spec and spec-cost suites, the self-drafter
cost model and projection, and the report's "Speculative decoding" section."""

import json

import pytest
from conftest import HAS_MLX, HAS_TORCH

from bench import cost, report, run
from bench.drafter_cost import self_draft_cost, self_draft_plan
from bench.hardware import get_device
from bench.pass_cost import decoder_cost, encoder_cost, load_preset
from bench.projection import ProjectedModel, project_speculative
from bench.roofline import floor
from drafter.plan import SelfDraftPlan
from mlx_diffgem.core.config import FULL, ModelConfig
from mlx_diffgem.core.tiny import tiny_config_dict

BACKENDS = [b for b, ok in (("torch", HAS_TORCH), ("mlx", HAS_MLX)) if ok]
RELEASED = load_preset("diffusiongemma-26b-a4b")

# A short spec run: 2 held-out prompts, one 64-token canvas, at most 4 target passes.
SPEC_ARGS = [
    "spec", "--drafter", "self", "--drafter", "target", "--drafter", "default",
    "--prompts", "2",
    "--max-tokens", "64", "--repeats", "1", "--warmup", "0",
    "--max-denoising-steps", "4", "--spec-draft-steps", "2",
]  # fmt: skip


def _spec(tmp_path, backend: str, capsys) -> tuple[list[dict], dict]:
    out = tmp_path / "results"
    assert run.main([*SPEC_ARGS, "--backend", backend, "--out", str(out)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    files = sorted(out.glob("*.json"))
    return [json.loads(p.read_text()) for p in files], last


@pytest.fixture(scope="module")
def spec_records(tmp_path_factory):
    if not BACKENDS:
        pytest.skip("no backend installed")
    out = tmp_path_factory.mktemp("spec")
    argv = [*SPEC_ARGS, "--backend", BACKENDS[0], "--out", str(out)]
    assert run.main(argv) == 0
    return out, {json.loads(p.read_text())["drafter"]["name"]: p for p in out.iterdir()}


def test_spec_writes_one_record_per_drafter(spec_records):
    out, paths = spec_records
    assert set(paths) == {"self", "target", "default"}
    assert paths["self"].name.endswith("-self.json")
    assert paths["target"].name.endswith("-target.json")
    # one time stamp for the run, however long it takes to write the records
    assert len({json.loads(p.read_text())["created"] for p in paths.values()}) == 1
    for name, path in paths.items():
        rec = json.loads(path.read_text())
        assert rec["schema"] == report.SCHEMA and rec["suite"] == "spec"
        assert rec["backend"] == BACKENDS[0] and rec["model"]["preset"] == "default"
        assert rec["model"]["weights"].startswith("trained")
        for k in ("machine", "versions", "git", "spec_policy", "settings"):
            assert rec[k], k
        assert rec["spec_policy"]["draft_steps"] == 2
        settings = rec["settings"]
        assert settings["prompts"] == 2 and settings["max_tokens"] == 64
        assert "held-out" in settings["prompt_source"] and settings["batch"] == 1
        kind = "trained" if name == "default" else "self"
        assert rec["drafter"]["name"] == name and rec["drafter"]["kind"] == kind
        nat, spec = rec["native"], rec["speculative"]
        for entry in (nat, spec):
            tp = entry["target_passes_per_canvas"]
            assert 1 <= tp["p50"] <= 4 and 1 <= tp["mean"] <= 4
            assert entry["canvases"] == 2  # 2 prompts x 1 canvas x 1 repeat
            assert entry["tokens_per_target_pass"] == pytest.approx(
                entry["generated_tokens"] / entry["target_passes"], rel=1e-3
            )
            assert entry["tokens_per_s"] > 0 and len(entry["tokens_per_s_per_repeat"])
            assert 0 <= entry["parse_rate"] <= 1 and entry["completions"] == 2
            assert entry["committed_entropy"] >= 0
            assert 0 <= entry["committed_argmax_agreement"] <= 1
            assert 0 < entry["distinct_bigram_share"] <= 1
        assert nat["drafter_passes_per_canvas"]["mean"] == 0
        assert nat["verify_rounds_per_canvas"]["mean"] == 0
        assert 1 <= spec["drafter_passes_per_canvas"]["mean"]
        assert 1 <= spec["verify_rounds_per_canvas"]["mean"]
        # the first draft: at most --spec-draft-steps passes, part of the drafter's
        first = spec["first_draft_passes_per_canvas"]
        assert 1 <= first["min"] and first["max"] <= 2
        assert first["mean"] <= spec["drafter_passes_per_canvas"]["mean"]
        assert nat["first_draft_passes_per_canvas"]["max"] == 0
        assert 0 <= spec["draft_kept_share"] <= 1
        r = rec["ratios"]
        assert r["tokens_per_s_spec_over_native"] == pytest.approx(
            spec["tokens_per_s"] / nat["tokens_per_s"], rel=1e-3
        )
        assert r["target_passes_native_over_spec"] == pytest.approx(
            nat["target_passes_per_canvas"]["mean"]
            / spec["target_passes_per_canvas"]["mean"],
            rel=1e-3,
        )
        pp = rec["parse_paired"]
        assert pp["pairs"] == 2
        assert (
            pp["both"] + pp["native_only"] + pp["speculative_only"] + pp["neither"] == 2
        )
        assert pp["difference"] == pytest.approx(
            spec["parse_rate"] - nat["parse_rate"], abs=1e-3
        )
        lo, hi = pp["difference_95"]
        assert lo <= pp["difference"] <= hi
        assert "extra target decode pass" in rec["entropy_source"]
        # the cost model on this model and on the released shape, and the projection
        assert 0 < rec["cost"]["this_model"]["flops_ratio"] <= 1
        assert 0 < rec["cost"]["released"]["flops_ratio"] <= 1
        proj = rec["projection"]
        assert set(proj["devices"]) == {"M1 Ultra", "M4 Max", "M5 Max"}
        assert (
            proj["passes_per_canvas"]["native_target"]
            == (nat["target_passes_per_canvas"]["mean"])
        )
        m1 = proj["devices"]["M1 Ultra"]
        assert m1["published"][0]["tokens_per_s"] == 15.0
        assert m1["published"][0]["autoregressive_tokens_per_s"] == 71.3
        assert proj["devices"]["M4 Max"]["published"] == []
    target = json.loads(paths["target"].read_text())
    assert target["cost"]["this_model"]["flops_ratio"] == pytest.approx(1.0)
    # with the target as its own drafter, the FLOP-bound speedup is total passes
    n_tp = target["native"]["target_passes_per_canvas"]["mean"]
    s = target["speculative"]
    s_tp = s["target_passes_per_canvas"]["mean"]
    d_tp = s["drafter_passes_per_canvas"]["mean"]
    assert target["cost"]["this_model"]["speedup_at_flops_ratio"] == pytest.approx(
        n_tp / (s_tp + d_tp)
    )
    assert target["cost"]["released"]["flops_ratio"] == pytest.approx(1.0)
    self_rec = json.loads(paths["self"].read_text())
    assert self_rec["cost"]["released"]["flops_ratio"] < 1
    # the native baseline is measured once and shared by every drafter's record
    assert self_rec["native"] == target["native"]
    # the measured passes at their bytes: the target as its own drafter costs a
    # pass per drafter pass; the hidden verify a bit more than a plain pass
    bytes_t = target["byte_regimes"]["h200-bf16"]
    v = s["verify_rounds_per_canvas"]["mean"]
    assert bytes_t["drafter_pass_ratio"] == pytest.approx(1.0)
    assert bytes_t["spec_pass_equivalents"] == pytest.approx(
        s_tp - v + v * bytes_t["verify_pass_ratio"] + d_tp
    )
    # the trained drafter: its own layers are costed, here and at release width
    trained = json.loads(paths["default"].read_text())
    assert trained["drafter"]["kind"] == "trained"
    for where in ("this_model", "released"):
        assert trained["cost"][where]["drafter"]["flops_by_part"]["adapter"] > 0
    assert trained["cost"]["released"]["adapter"]["hidden_size"] == 2816
    assert trained["cost"]["released"]["bytes_ratio"] < 0.15
    assert "released_plan" in trained["projection"]["drafter_plan_source"]


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
def test_spec_on_the_other_backend(tmp_path, capsys):
    recs, last = _spec(tmp_path, BACKENDS[1], capsys)
    assert [r["drafter"]["name"] for r in recs] == ["default", "self", "target"]
    assert [x["drafter"] for x in last["records"]] == ["self", "target", "default"]
    assert all(r["backend"] == BACKENDS[1] for r in recs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_cost_record(tmp_path, backend):
    out = tmp_path / "results"
    argv = ["spec-cost", "--backend", backend, "--preset", "tiny", "--context", "12"]
    argv += ["--drafter", "self", "--drafter", "self:layers=0 top_k=1"]
    argv += ["--steps", "4", "--repeats", "2", "--warmup", "0", "--out", str(out)]
    assert run.main([*argv, "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    (path,) = out.glob("*.json")
    rec = json.loads(path.read_text())
    assert rec["suite"] == "spec-cost" and rec["model"]["preset"] == "tiny"
    (point,) = rec["results"]
    assert point["target_ms"]["n"] == 2 * 4
    small = point["drafters"]["self:layers=0 top_k=1"]
    assert small["plan"]["layers"] == [0] and small["drafter_ms"]["n"] == 8
    assert small["measured_ratio"] > 0
    assert (
        small["predicted_flops_ratio"]
        < point["drafters"]["self"]["predicted_flops_ratio"]
        < 1
    )
    assert rec["released"]["flops_ratio"] < 1
    assert rec["released"]["plan"]["layers"] is None  # auto keeps every layer
    assert rec["summary"]["drafter_over_target_pass"]["12"]["self"] > 0


def test_parse_paired_counts_and_interval():
    from bench.spec_suites import SpecRun, parse_paired

    def runs(outcomes):
        return [SpecRun(i, 0, None, [], "", ok, 1.0) for i, ok in enumerate(outcomes)]

    nat = runs([True] * 20 + [False] * 20)
    same = parse_paired(nat, runs([True] * 20 + [False] * 20))
    assert same["difference"] == 0 and same["difference_95"] == [0.0, 0.0]
    worse = parse_paired(nat, runs([True] * 16 + [False] * 24))
    counts = (worse["both"], worse["native_only"], worse["speculative_only"])
    assert counts == (16, 4, 0)
    assert worse["difference"] == -0.1
    lo, hi = worse["difference_95"]
    assert lo < -0.1 < hi < 0  # 4 discordant pairs of 40: a real, if loose, loss


@pytest.mark.parametrize(
    "argv, match",
    [
        (["spec", "--preset", "tiny"], "no --preset"),
        (["step", "--drafter", "self"], "only for the spec suites"),
        (["spec", "--drafter", "self", "--drafter", "self"], "each drafter once"),
        (["spec-cost", "--model", "x"], "only for spec"),
    ],
)
def test_spec_argument_errors(argv, match, capsys):
    with pytest.raises(SystemExit):
        run.main(argv)
    assert match in capsys.readouterr().err


# -- the cost model --------------------------------------------------------------------


def _uniform(layers: int = 6) -> ModelConfig:
    """Every layer the same (full attention; the config makes the last layer full), so
    per-layer costs are equal."""
    raw = tiny_config_dict()
    raw["text_config"].update(num_hidden_layers=layers, layer_types=[FULL] * layers)
    cfg = ModelConfig.from_dict(raw)
    assert all(cfg.is_full(i) for i in range(layers))
    return cfg


@pytest.mark.parametrize("cfg", [RELEASED, _uniform()], ids=["released", "uniform"])
def test_a_plan_without_cuts_costs_a_target_step(cfg):
    plain = decoder_cost(cfg, 512)
    full = decoder_cost(cfg, 512, plan=SelfDraftPlan())
    assert full.flops == plain.flops and full.bytes == plain.bytes
    rep = self_draft_cost(cfg, SelfDraftPlan(), devices=[get_device("H100")])
    assert rep["flops_ratio"] == rep["bytes_ratio"] == 1.0
    assert rep["floor_ratio"]["H100 SXM"] == pytest.approx(1.0)
    assert self_draft_plan(cfg, "target") == SelfDraftPlan()


def test_kept_layers_scale_the_layer_costs_proportionally():
    cfg = _uniform(6)
    full = decoder_cost(cfg, 100)
    for n in (1, 2, 3, 6):
        d = decoder_cost(cfg, 100, plan=SelfDraftPlan(layers=tuple(range(n))))
        for part in ("layers", "attention"):
            assert d.flops[part] == pytest.approx(full.flops[part] * n / 6)
        assert d.bytes["kv_read"] == pytest.approx(full.bytes["kv_read"] * n / 6)
        fixed = full.total_flops - full.flops["layers"] - full.flops["attention"]
        per_layer = (full.flops["layers"] + full.flops["attention"]) / 6
        assert d.total_flops == pytest.approx(fixed + n * per_layer)
    ratios = [
        self_draft_cost(cfg, SelfDraftPlan(layers=tuple(range(n))))["flops_ratio"]
        for n in range(1, 7)
    ]
    assert ratios == sorted(ratios) and ratios[-1] == pytest.approx(1.0)


def test_each_cut_shrinks_its_own_part():
    cfg = RELEASED
    T, H, V = cfg.canvas_length, cfg.hidden_size, cfg.vocab_size
    full = decoder_cost(cfg, 512)
    head = decoder_cost(cfg, 512, plan=SelfDraftPlan(head_vocab=1024))
    assert head.flops["lm_head"] == 2.0 * T * 1024 * H
    assert head.bytes["weights"] < full.bytes["weights"]
    # the drafter's sampler works at its head's width
    assert head.bytes["sampler"] == full.bytes["sampler"] * 1024 / V
    soft = decoder_cost(cfg, 512, plan=SelfDraftPlan(sc_top_k=32))
    assert soft.flops["soft_embedding"] == 2.0 * T * 32 * H
    assert full.flops["soft_embedding"] == 2.0 * T * V * H
    assert soft.bytes["embedding_reread"] < full.bytes["embedding_reread"]
    experts = decoder_cost(cfg, 512, plan=SelfDraftPlan(top_k=4))
    assert experts.flops["layers"] < full.flops["layers"]
    assert experts.experts_hit_per_layer < full.experts_hit_per_layer
    for d in (head, soft, experts):  # untouched parts stay as they were
        assert d.flops["attention"] == full.flops["attention"]
    for d in (soft, experts):
        assert d.bytes["sampler"] == full.bytes["sampler"]
    auto = self_draft_cost(cfg)
    assert auto["plan"] == SelfDraftPlan.auto(cfg).to_dict()
    assert 0 < auto["flops_ratio"] < 1 and 0 < auto["bytes_ratio"] < 1


def test_projection_follows_the_pass_counts():
    same = project_speculative(30, 30, 0, drafter_cost=0.5)
    for dev in same["devices"].values():
        assert dev["floor"]["peak"]["speedup"] == pytest.approx(1.0)
    proj = project_speculative(
        30, 10, 10, drafter_cost=0.5, model=ProjectedModel(quant="bf16")
    )
    m5 = proj["devices"]["M5 Max"]
    peak = m5["floor"]["peak"]
    dec = decoder_cost(RELEASED, 512)
    enc = encoder_cost(RELEASED, RELEASED.canvas_length, 512)
    step = floor(dec, get_device("M5 Max")).floor_s
    commit = floor(enc, get_device("M5 Max")).floor_s
    assert peak["speedup"] == pytest.approx((30 * step + commit) / (15 * step + commit))
    assert peak["native_tokens_per_s"] == pytest.approx(256 / (30 * step + commit))
    assert {p["quant"] for p in m5["published"]} == {"MXFP4", "MXFP8"}
    for p in m5["published"]:
        assert p["scaled_by_speedup"] == pytest.approx(
            p["tokens_per_s"] * peak["speedup"]
        )
        assert p["autoregressive_tokens_per_s"] == 81.0 and "anchors.md" in p["source"]
    # without a given cost, each device charges the plan's own floor
    auto = project_speculative(30, 10, 10)
    assert 0 < auto["devices"]["M1 Ultra"]["floor"]["peak"]["drafter_cost"] < 1
    assert auto["drafter_plan"] == SelfDraftPlan.auto(RELEASED).to_dict()
    assert "M4 Max" in auto["devices"] and not auto["devices"]["M4 Max"]["published"]


def test_cost_cli_prints_the_drafter_and_the_projection(capsys):
    assert cost.main(["--drafter", "--project", "48,40,12", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    auto = SelfDraftPlan.auto(RELEASED).to_dict()
    assert rep["drafter"]["plan"] == json.loads(json.dumps(auto))
    assert rep["drafter"]["flops_ratio"] < 1
    m1 = rep["devices"]["M1 Ultra"]["peak"]
    assert m1["drafter_cost"] == pytest.approx(
        rep["drafter"]["floor_ratio"]["M1 Ultra"]
    )
    assert set(rep["projection"]["devices"]) == {"M1 Ultra", "M4 Max", "M5 Max"}
    assert cost.main(["--drafter", "layers=0,5 top_k=1", "--project", "4,2,6"]) == 0
    text = capsys.readouterr().out
    assert "self-drafter pass" in text and "mlxcel" in text


# -- the report ------------------------------------------------------------------------


def test_report_renders_the_speculative_section(spec_records, tmp_path):
    out, paths = spec_records
    src = tmp_path / "records"
    src.mkdir()
    for name in ("self", "target"):
        (src / paths[name].name).write_text(paths[name].read_text())
    argv = ["spec-cost", "--backend", BACKENDS[0], "--preset", "tiny"]
    argv += ["--context", "12", "--steps", "4", "--repeats", "1", "--warmup", "0"]
    argv += ["--checkpoint-dir", str(tmp_path / "ck"), "--out", str(src)]
    assert run.main(argv) == 0
    records = report.load_records([src])
    assert len(records) == 3  # one per drafter (the key tells them apart) + spec-cost
    text = report.tables(records)
    assert "### Speculative decoding" in text and "### Projection" in text
    rows = report.spec_table(records).splitlines()[2:]
    assert len(rows) == 2
    # the drafter column names the settings that differ from SpecPolicy's defaults
    # a plain "self" also names the cuts it meant (the auto plan changes over time)
    d = json.loads(paths["self"].read_text())["drafter"]
    cuts = " ".join(
        f"{k}={d[k]}" for k in ("top_k", "sc_top_k", "head_vocab") if d[k] is not None
    )
    assert f"| self ({cuts}), draft_steps=2, 2 prompts |" in rows[0]
    assert "| target, draft_steps=2, 2 prompts |" in rows[1]
    # the FLOP-bound speedup column: the record's own figure, with the ratio used
    for row, name in zip(rows, ("self", "target"), strict=True):
        here = json.loads(paths[name].read_text())["cost"]["this_model"]
        cell = f"| {here['speedup_at_flops_ratio']:.2f} ({here['flops_ratio']:.2f}) |"
        assert cell in row
        # where bytes bind: the pass-equivalents of both regimes, native / spec
        mac = json.loads(paths[name].read_text())["byte_regimes"]["mac-4bit"]
        cell = f"| {mac['native_pass_equivalents']:.1f} / "
        assert cell + f"{mac['spec_pass_equivalents']:.1f} (x" in row
    (cost_row,) = report.spec_cost_table(records).splitlines()[2:]
    assert "| tiny |" in cost_row and "| 12 | self |" in cost_row
    auto = SelfDraftPlan.auto(RELEASED)
    assert "Released shape" in text and f"head_vocab={auto.head_vocab}" in text
    assert "M1 Ultra" in report.projection_table(records)
    assert "mlxcel" in report.projection_table(records)
    plain = [r for r in records if not r["suite"].startswith("spec")]
    assert "Speculative" not in report.tables(plain)
    pytest.importorskip("matplotlib")
    written = report.build([src], tmp_path / "report")
    md = (tmp_path / "report" / "REPORT.md").read_text()
    assert "speculative.png" in md and "-self.json" in md
    png = tmp_path / "report" / "speculative.png"
    assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
