"""The benchmark harness: records, the report, the sharded random checkpoint, spec."""

import json
import tracemalloc

import numpy as np
import pytest
from conftest import HAS_MLX, HAS_TORCH, HAS_TRANSFORMERS

from bench import checkpoints, report, run
from mlx_diffgem.core.config import ModelConfig
from mlx_diffgem.core.tiny import random_weights, tiny_config_dict

BACKENDS = [b for b, ok in (("mlx", HAS_MLX), ("torch", HAS_TORCH)) if ok]


def _run(tmp_path, *argv: str) -> dict:
    out = tmp_path / "results"
    args = [*argv, "--preset", "tiny", "--out", str(out)]
    assert run.main([*args, "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_record_has_the_required_keys(tmp_path, backend):
    rec = _run(
        tmp_path,
        "step",
        "--backend",
        backend,
        "--context",
        "12,20",
        "--steps",
        "5",
        "--repeats",
        "2",
        "--warmup",
        "0",
    )
    assert rec["schema"] == report.SCHEMA and rec["suite"] == "step"
    assert rec["backend"] == backend and rec["dtype"] == "float32"
    for k in ("platform", "os", "cpu", "cpu_count", "ram_gb", "accelerator", "threads"):
        assert k in rec["machine"], k
    for k in ("python", "numpy", "mlx", "torch", "transformers", "mlx_vlm"):
        assert k in rec["versions"], k
    assert {"sha", "dirty"} <= set(rec["git"])
    model = rec["model"]
    assert model["weights"] == "random" and model["preset"] == "tiny"
    assert len(model["config_hash"]) == 12 and model["text_config"]["vocab_size"] == 128
    assert "quantization" in rec and rec["settings"]["protocol"]
    assert [r["context"] for r in rec["results"]] == [12, 20]
    for r in rec["results"]:
        s = r["step_ms"]
        assert s["n"] == 2 * (5 - 3) and s["p10"] <= s["median"] <= s["p90"]
        assert s["iqr"] >= 0 and r["decode_ms"]["median"] > 0
    assert set(rec["summary"]["ms_per_step"]) == {"12", "20"}
    assert rec["compile_s"] is None  # not compiled
    if backend == "torch":
        assert rec["expert_gemm"] == "grouped_mm"
        for r in rec["results"]:
            assert r["host_syncs_per_step"] == {
                "per_step": 0.0,
                "method": "expert-GEMM reads",
            }
    else:
        assert (
            rec["expert_gemm"] is None
            and rec["results"][0]["host_syncs_per_step"] is None
        )


def test_a_record_names_the_code_as_it_was_when_the_run_started(monkeypatch):
    """Records are written at a run's end: what the tree holds by then (a commit, an
    edit made meanwhile) is not the code that ran."""
    from bench import record

    tree = {"rev-parse": "a" * 40, "status": "", "diff": "", "ls-files": ""}
    monkeypatch.setattr(record, "_run", lambda *cmd: tree[cmd[1]])
    monkeypatch.setattr(record, "_PINNED", None)
    record.pin_git()
    tree.update({"rev-parse": "b" * 40, "status": " M bench/run.py", "diff": "+x"})
    assert record.git() == {
        "sha": "a" * 40,
        "dirty": False,
        "diff_sha256": None,
        "untracked_code": [],
    }
    monkeypatch.setattr(record, "_PINNED", None)  # not pinned: the tree as it is now
    assert record.git()["sha"] == "b" * 40 and record.git()["dirty"]


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_step_record_counts_the_loop_paths_host_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFGEM_EXPERT_GEMM", "loop")
    rec = _run(
        tmp_path, "step", "--backend", "torch", "--context", "12", "--steps", "4",
        "--repeats", "1", "--warmup", "0",
    )  # fmt: skip
    assert rec["expert_gemm"] == "loop"
    # two grouped GEMMs in each of the tiny preset's MoE layers, once per step
    layers = rec["model"]["text_config"]["num_hidden_layers"]
    want = 2.0 * layers
    assert rec["results"][0]["host_syncs_per_step"]["per_step"] == want


@pytest.mark.skipif(not (HAS_TORCH and HAS_TRANSFORMERS), reason="needs transformers")
def test_peers_interleaves_ours_and_transformers(tmp_path):
    rec = _run(
        tmp_path,
        "peers",
        "--backend",
        "torch",
        "--context",
        "10",
        "--steps",
        "5",
        "--repeats",
        "1",
        "--warmup",
        "0",
    )
    (point,) = rec["results"]
    assert rec["peers"]["transformers"]["status"] == "ok"
    assert set(point["impls"]) == {"mlx_diffgem[torch]", "transformers"}
    ratio = point["ratios"]["transformers"]["step_ours_over_peer"]
    assert ratio == pytest.approx(
        point["impls"]["mlx_diffgem[torch]"]["step_ms"]["median"]
        / point["impls"]["transformers"]["step_ms"]["median"],
        rel=1e-3,
    )


@pytest.mark.skipif(not (HAS_TORCH and HAS_TRANSFORMERS), reason="needs transformers")
def test_the_device_peer_has_our_weights_tied_once():
    """bench.peer_weights: transformers built with parameters on meta, each tied
    tensor made once, filled by name as ours: the same logits; another seed differs."""
    import torch

    from bench import device_weights, peer_weights

    torch.set_num_threads(1)
    ours = device_weights.torch_target("tiny", device="cpu", dtype="float32", seed=3)
    cfg = ours.config
    rng = np.random.default_rng(0)
    ids = rng.integers(8, cfg.vocab_size - 8, (1, 13))
    canvas = rng.integers(0, cfg.vocab_size - 8, (1, cfg.canvas_length))
    cache = ours.new_cache(1)
    ours.encode(ids.astype(np.int32), cache)
    want = ours.decode(canvas.astype(np.int32), cache).numpy()
    for seed, same in ((3, True), (4, False)):
        hf = peer_weights.transformers_model(
            "tiny", device="cpu", dtype=torch.float32, seed=seed
        )
        named = list(hf.named_parameters(remove_duplicate=False))
        assert {p.device.type for _, p in named} == {"cpu"}
        assert len({p.data_ptr() for _, p in named}) == len(list(hf.parameters()))
        assert len(named) > len(list(hf.parameters()))  # tied encoder aliases
        with torch.no_grad():
            got = hf(
                input_ids=torch.from_numpy(ids),
                decoder_input_ids=torch.from_numpy(canvas),
            ).logits.numpy()
        assert (np.abs(got - want).max() < 1e-4) == same


@pytest.mark.skipif(not (HAS_TORCH and HAS_TRANSFORMERS), reason="needs transformers")
def test_peers_one_implementation_per_process(tmp_path):
    """--solo: each record holds one implementation; the device table pairs them."""
    from bench import device_table

    base = ["peers", "--backend", "torch", "--context", "10", "--steps", "5"]
    base += ["--repeats", "1", "--warmup", "0", "--weights", "device"]
    base += ["--device", "cpu", "--preset", "tiny", "--out", str(tmp_path)]
    for solo in ("ours", "transformers"):
        assert run.main([*base, "--solo", solo]) == 0
    recs = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    impls = sorted(next(iter(r["results"][0]["impls"])) for r in recs)
    assert impls == ["mlx_diffgem[torch]", "transformers"]
    assert all(r["results"][0]["ratios"] == {} for r in recs)
    ms = {
        k: v["step_ms"]["median"]
        for r in recs
        for k, v in r["results"][0]["impls"].items()
    }
    (row,) = device_table.paired_peers(recs)
    assert row[2] == f"x{ms['mlx_diffgem[torch]'] / ms['transformers']:.3f}"
    for r in recs:
        r["_file"] = "x.json"
    lines = report.peers_table(recs).splitlines()
    (line,) = [x for x in lines if "(one per process)" in x]
    # the table's ratio comes from its rounded medians: within a unit of the last digit
    cells = [c.strip() for c in line.split("|")]
    ratio = ms["mlx_diffgem[torch]"] / ms["transformers"]
    assert any(_close(c, ratio) for c in cells), line
    assert report.peers_table(recs[:1]).count("\n") == 1  # alone: no row yet


def _synthetic(accel: str, device: str, backend: str, suite: str, results: list):
    return {
        "schema": report.SCHEMA,
        "suite": suite,
        "created": "2026-01-01T00:00:00+00:00",
        "machine": {
            "accelerator": accel,
            "cpu_count": 12,
            "threads": {},
            "loadavg": [0.5, 0.5, 0.5],
        },
        "git": {"sha": "0" * 40, "dirty": False},
        "backend": backend,
        "device": device,
        "dtype": "bfloat16",
        "quantization": None,
        "model": {"preset": "mid"},
        "settings": {"batch": 1},
        "results": results,
    }


def _step(ctx: int, ms: float) -> dict:
    return {"context": ctx, "batch": 1, "step_ms": {"median": ms}, "pct_of_floor": 25.0}


def _gen(ctx: int, tps: float) -> dict:
    return {
        "context": ctx,
        "tokens_per_s": tps,
        "steps_per_canvas": 15.0,
        "tokens_per_forward": 4.3,
        "pct_of_floor": 30.0,
    }


def test_report_merges_two_devices(tmp_path):
    recs = [
        _synthetic(
            "Apple M4 Max", "gpu", "mlx", "step", [_step(64, 40), _step(512, 45)]
        ),
        _synthetic("Apple M4 Max", "gpu", "mlx", "generate", [_gen(512, 120.5)]),
        _synthetic("NVIDIA H100", "cuda", "torch", "step", [_step(512, 6.0)]),
        _synthetic("NVIDIA H100", "cuda", "torch", "generate", [_gen(512, 900.0)]),
    ]
    src = tmp_path / "records"
    src.mkdir()
    for i, r in enumerate(recs):
        (src / f"r{i}.json").write_text(json.dumps(r))
    (src / "other.json").write_text(json.dumps({"benchmark": "step_hygiene"}))
    table = report.main_table(report.load_records([src]))
    assert "Apple M4 Max (gpu)" in table and "NVIDIA H100 (cuda)" in table
    assert "120.5" in table and "900.0" in table and "45.00" in table
    pytest.importorskip("matplotlib")
    written = report.build([src], tmp_path / "out")
    md = (tmp_path / "out" / "REPORT.md").read_text()
    assert "NVIDIA H100 (cuda)" in md and "step_vs_context.png" in md
    pngs = [p for p in written if p.suffix == ".png"]
    assert len(pngs) == 2
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_tensor_specs_match_the_tiny_layout():
    cfg = ModelConfig.from_dict(tiny_config_dict())
    specs = {s.name: s.shape for s in checkpoints.tensor_specs(cfg)}
    assert specs == {k: v.shape for k, v in random_weights(cfg).items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_writer_streams_and_loads(tmp_path, backend):
    from mlx_diffgem import api

    raw = tiny_config_dict(8, vocab_size=8192, hidden_size=64)
    chunk = 32 * 1024
    checkpoints.write_sharded(tmp_path / "warm", tiny_config_dict())  # lazy imports
    tracemalloc.start()
    path = checkpoints.write_sharded(
        tmp_path, raw, dtype="bfloat16", shard_bytes=64 * 1024, chunk_bytes=chunk
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    total = index["metadata"]["total_size"]
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and total > 1_000_000
    assert peak < 12 * chunk < total / 3  # one chunk at a time, not the model
    model, _ = api.load(path, backend=backend, dtype="float32")
    cache = model.new_cache(1)
    model.encode(np.arange(5, 17, dtype=np.int32)[None], cache)
    logits = np.asarray(api.to_numpy(model.decode(np.full((1, 8), 7), cache)))
    assert logits.shape == (1, 8, 8192) and np.isfinite(logits).all()


def test_floor_device_matches_the_chip_name():
    from bench.record import floor_device

    assert floor_device("Apple M4 Max").name == "M4 Max"
    assert floor_device("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert floor_device("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert floor_device("AMD EPYC") is None
    assert floor_device("AMD EPYC", measured="here") == "here"


def test_build_streams_a_sharded_preset_once(tmp_path, monkeypatch):
    small = checkpoints.Preset(8, {"vocab_size": 512}, dtype="bfloat16", sharded=True)
    monkeypatch.setitem(checkpoints.PRESETS, "small-sharded", small)
    path = checkpoints.build("small-sharded", root=tmp_path)
    assert (path / "model.safetensors.index.json").is_file()
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert checkpoints.build("small-sharded", root=tmp_path) == path  # reused
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp folders left


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_step_on_device_made_weights(tmp_path):
    """--weights device (what a lent GPU runs for the released shape) on the CPU:
    no checkpoint is written, the record says so, and the floor uses torch's
    measured rates when the device is CUDA (here: numpy's, as any CPU run)."""
    rec = _run(
        tmp_path,
        "step",
        "--backend",
        "torch",
        "--weights",
        "device",
        "--device",
        "cpu",
        "--context",
        "12",
        "--steps",
        "5",
        "--repeats",
        "1",
        "--warmup",
        "0",
    )
    assert not (tmp_path / "ck").exists()
    model = rec["model"]
    assert model["weights"] == "random-on-device" and model["checkpoint"] is None
    assert rec["settings"]["weights"] == "device"
    assert rec["results"][0]["step_ms"]["median"] > 0


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_fp8_step_on_device_made_weights(tmp_path):
    rec = _run(
        tmp_path, "step", "--backend", "torch", "--weights", "device", "--device",
        "cpu", "--quantization", "fp8", "--context", "12", "--steps", "4",
        "--repeats", "1", "--warmup", "0",
    )  # fmt: skip
    assert rec["quantization"] == "fp8" and rec["results"][0]["step_ms"]["median"] > 0


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_device_weights_follow_the_checkpoint_recipe():
    import torch

    from bench.device_weights import torch_target

    t = torch_target("mid", device="cpu", seed=1)
    sd = t.model.state_dict()
    emb = sd["embed_tokens.weight"]
    assert emb.dtype == torch.float32 and abs(emb.std().item() - 0.3) < 0.01
    assert abs(sd["layers.0.self_attn.q_proj.weight"].std().item() - 0.02) < 0.002
    assert abs(sd["layers.0.router.proj.weight"].std().item() - 1.0) < 0.05
    assert abs(sd["norm.weight"].mean().item() - 1.0) < 0.1
    assert sd["layers.1.layer_scalar"].item() == pytest.approx(0.6)
    again = torch_target("mid", device="cpu", seed=1).model.state_dict()
    assert all(torch.equal(sd[k], again[k]) for k in sd)  # seeded
    cache = t.new_cache(1)
    t.encode(np.arange(5, 40)[None], cache)
    assert torch.isfinite(t.decode(np.arange(64)[None] + 5, cache)).all()
    with pytest.raises(ValueError, match="dtype"):
        torch_target("tiny", device="cpu", dtype="int4")


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_measure_torch_on_cpu():
    from bench.hardware import measure_torch

    dev = measure_torch("cpu", repeats=1)
    assert dev.name == "this-machine" and dev.matmul_tflops.value > 1e-3
    assert dev.bandwidth_gbs.value > 0.1 and dev.matmul_tflops.basis == "measured"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["step", "--weights", "device"], "torch backend only"),
        (
            [
                "step",
                "--backend",
                "torch",
                "--weights",
                "device",
                "--quantization",
                "4bit",
            ],
            "quantization int8 or fp8",
        ),
        (["peers", "--backend", "torch", "--weights", "device"], "pass --solo"),
        (["step", "--solo", "ours"], "--solo: only for the peers suite"),
        (
            ["peers", "--solo", "transformers", "--peers", "mlx_vlm"],
            "--peers names another",
        ),
        (
            ["peers", "--backend", "torch", "--weights", "device", "--solo", "mlx_vlm"],
            "transformers or ours",
        ),
    ],
)
def test_device_weights_argument_errors(argv, match, capsys):
    with pytest.raises(SystemExit):
        run.main(argv)
    assert match in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_device_check_script_on_cpu(tmp_path):
    """bench/device_check.sh, the one-call GPU run, in its CPU smoke-test form."""
    import os
    import subprocess
    import sys

    env = dict(
        os.environ,
        OUT=str(tmp_path),
        DEVICE="cpu",
        PRESET="tiny",
        CONTEXTS="12",
        STEPS="4",
        CHEAP_DRAFTER="self:layers=0,3",
        PY=sys.executable,
        OMP_NUM_THREADS="1",
        WHEELS="",  # the installed transformers
    )
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "device_check.sh"
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    recs = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    steps = [r for r in recs if r["suite"] == "step"]
    runs = sorted((str(r["compile"]), str(r["quantization"])) for r in steps)
    assert runs == [
        ("None", "None"),
        ("None", "fp8"),
        ("default", "None"),
        ("reduce-overhead", "None"),
    ]
    for r in steps:
        assert r["expert_gemm"] == "grouped_mm"
        assert r["results"][0]["host_syncs_per_step"]["per_step"] == 0
        assert (r["compile_s"] is None) == (r["compile"] is None)
    (gen,) = [r for r in recs if r["suite"] == "generate"]
    assert gen["results"][0]["tokens_per_s"] > 0
    (cost,) = [r for r in recs if r["suite"] == "spec-cost"]
    assert set(cost["results"][0]["drafters"]) == {"self", "self:layers=0,3"}
    table = out.stdout[out.stdout.rindex("| run |") :].splitlines()
    assert any(line.startswith("| step reduce-overhead/layer") for line in table)
    assert any("drafter self:layers=0,3" in line for line in table)
    # the peer and ours, one per process, on the same random weights
    peers = {r["solo"]: r for r in recs if r["suite"] == "peers"}
    assert set(peers) == {"ours", "transformers"}
    assert peers["transformers"]["peers"]["transformers"]["status"] == "ok"
    assert peers["transformers"]["model"]["weights"] == "random-on-device"
    assert any(
        line.startswith("| peers mlx_diffgem[torch]/transformers") for line in table
    )


def _close(cell: str, value: float) -> bool:
    try:
        return abs(float(cell) - value) <= 1.5e-3
    except ValueError:
        return False
