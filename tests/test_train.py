"""The training objective, corpus and export of the embedded model (tiny and fast)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_mlx, needs_torch, needs_transformers

pytestmark = [pytest.mark.torch, needs_torch]

C, P, N = 8, 5, 4  # canvas, clean prefix, canvases: ids are [B, P + N*C]


@pytest.fixture(scope="module")
def torch_mod():
    import torch

    torch.set_num_threads(1)
    return torch


@pytest.fixture(scope="module")
def model(torch_mod):
    """A tiny model with weights large enough that every input matters."""
    from cuda_backend import train

    m = train.build_model(
        train.model_config_dict("tiny", vocab_size=64, canvas_length=C), std=0.2
    )
    with torch_mod.no_grad():
        for i, layer in enumerate(m.layers):  # the two modes must differ
            layer.layer_scalar.fill_(0.6 + 0.1 * i)
            layer.encoder_layer_scalar.fill_(1.2 - 0.1 * i)
    return m


def _ids(torch, seed: int, *shape: int):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def _decoder_logits(model, ids, noisy, sc=None):
    import torch

    from cuda_backend import train

    with torch.no_grad():
        _, prefixes = train.encoder_pass(model, ids)
        return train.decoder_pass(model, noisy, prefixes, P, sc)


def test_training_decoder_equals_inference_decode(torch_mod, model):
    """Each folded canvas = the inference decoder after encoding its clean prefix,
    with self-conditioning, and prefixes longer than the window (W = 8)."""
    from cuda_backend.cache import Cache

    torch = torch_mod
    ids, noisy = _ids(torch, 0, 2, P + N * C), _ids(torch, 1, 2, N * C)
    sc = torch.randn(2, N * C, 64, generator=torch.Generator().manual_seed(2))
    got = _decoder_logits(model, ids, noisy, sc)
    for b in range(N):
        cache = Cache(model.config, 2, 64, "cpu", torch.float32)
        model.encode(ids[:, : P + b * C], cache)
        block = slice(b * C, (b + 1) * C)
        want = model.decode(noisy[:, block], cache, sc[:, block])
        diff = (got[:, block] - want).abs().max().item()
        assert diff < 1e-4, f"canvas {b}: max diff {diff:.2e}"


def test_block_mask_by_perturbation(torch_mod, model):
    """Canvas b sees the clean tokens before it only: changing its own block's clean
    tokens or any later ones leaves it unchanged; earlier ones change it."""
    torch = torch_mod
    ids, noisy = _ids(torch, 3, 1, P + N * C), _ids(torch, 4, 1, N * C)
    base = _decoder_logits(model, ids, noisy)
    b = 2
    start = P + b * C
    later = ids.clone()
    later[:, start:] = (later[:, start:] + 1) % 64
    out = _decoder_logits(model, later, noisy)
    # (not bit-equal: other tokens' routing reorders the expert GEMM rows)
    seen = slice(0, (b + 1) * C)
    assert torch.allclose(out[:, seen], base[:, seen], atol=1e-5, rtol=0)
    assert not torch.allclose(out[:, (b + 1) * C :], base[:, (b + 1) * C :])
    for pos in (start - 1, 0):  # inside the window; seen by the full layers only
        earlier = ids.clone()
        earlier[:, pos] = (earlier[:, pos] + 1) % 64
        out = _decoder_logits(model, earlier, noisy)
        assert not torch.allclose(
            out[:, b * C : (b + 1) * C], base[:, b * C : (b + 1) * C]
        )


def test_noise_levels_and_corruption(torch_mod):
    from cuda_backend.train import noise_canvases

    torch = torch_mod
    target = torch.zeros(64, 32 * C, dtype=torch.long)
    noisy, t = noise_canvases(target, C, 10_000, torch.Generator().manual_seed(0))
    assert t.shape == (64, 32) and 0 <= t.min() and t.max() < 1
    # stratified: one level per 1/(B*n) interval
    hist = torch.histc(t, bins=16, min=0, max=1)
    assert torch.all(hist == t.numel() / 16)
    changed = (noisy != target).float().view(64, 32, C).mean(-1)
    assert abs((changed - t).mean().item()) < 0.02


def test_plausible_noise_replaces_noise_only_with_model_samples(torch_mod, model):
    """`plausible_noise` swaps about `share` of the noised positions for the model's
    own samples and leaves every clean position as it was."""
    from cuda_backend import train

    torch = torch_mod
    ids = _ids(torch, 5, 16, P + N * C)
    target = ids[:, P:]
    noisy, _ = train.noise_canvases(target, C, 64, torch.Generator().manual_seed(6))
    with torch.no_grad():
        _, prefixes = train.encoder_pass(model, ids)
        out = train.plausible_noise(
            model, noisy, target, prefixes, P, 0.5, torch.Generator().manual_seed(7)
        )
        logits = train.decoder_pass(model, noisy, prefixes, P)
    clean = noisy == target
    assert torch.equal(out[clean], target[clean])
    swapped = out != noisy
    assert 0.35 < swapped.sum() / (~clean).sum() < 0.6  # 0.5, less same-id draws
    # each swapped token is a draw from the model: never one it gives ~0 to
    p = torch.softmax(logits, -1).gather(-1, out[..., None])[..., 0]
    assert (p[swapped] > 1e-6).all()
    none = train.plausible_noise(
        model, noisy, target, prefixes, P, 0.0, torch.Generator().manual_seed(7)
    )
    assert torch.equal(none, noisy)


def test_low_noise_power_and_certainty_forcing(torch_mod, model):
    from cuda_backend import train

    torch = torch_mod
    target = torch.zeros(64, 32 * C, dtype=torch.long)
    _, t = train.noise_canvases(
        target, C, 10_000, torch.Generator().manual_seed(0), power=2.0
    )
    assert abs(t.median().item() - 0.25) < 0.02  # u ** 2: median 0.5 ** 2
    # Entropy counts only where the argmax is right; it is 0 for one-hot logits.
    logits = torch.tensor([[[9.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 5.0, 0.0]]])
    right = torch.tensor([[0, 2, 0]])  # only position 0 is predicted right
    h0 = train.certainty(logits, right, 1.0)
    p = torch.softmax(logits[0, 0], -1)
    assert torch.isclose(h0, -(p * p.log()).sum())
    assert train.certainty(logits, right, 0.1) < h0  # sharper at a lower temperature
    # A mask leaves out positions even when they are right; none left: zero.
    right2 = torch.tensor([[0, 2, 1]])  # positions 0 and 2 right
    where = torch.tensor([[False, True, True]])
    p2 = torch.softmax(logits[0, 2], -1)
    masked = train.certainty(logits, right2, 1.0, where)
    assert torch.isclose(masked, -(p2 * p2.log()).sum())
    assert train.certainty(logits, right2, 1.0, torch.zeros_like(where)) == 0
    ids = _ids(torch, 0, 2, P + N * C)
    gen = torch.Generator().manual_seed(0)
    obj = train.Objective(cf_weight=0.5)
    out = train.diffusion_loss(model, ids, P, obj, gen)
    want = out["diff"] + obj.lb_weight * out["lb"] + 0.5 * out["cf"]
    assert out["cf"] > 0 and torch.isclose(out["loss"], want)
    # cf_max_t below every drawn level: no canvas qualifies, no certainty term
    low = train.Objective(cf_weight=0.5, cf_max_t=-1.0)
    gen = torch.Generator().manual_seed(0)
    assert train.diffusion_loss(model, ids, P, low, gen)["cf"] == 0


def test_training_reduces_the_loss(torch_mod):
    from cuda_backend import train

    torch = torch_mod
    m = train.build_model(
        train.model_config_dict("tiny", vocab_size=64, canvas_length=C)
    )
    a = train.TrainArgs(lr=1e-2, warmup=0, min_lr_frac=1.0)
    opt = train.make_optimizer(m, a)
    obj = train.Objective(ar_weight=0.1)
    balance = train.RouterBalance(m)
    ids = torch.arange(P + N * C).repeat(4, 1) % 13 + 8  # a learnable pattern
    losses = []
    for _ in range(6):
        gen = torch.Generator().manual_seed(0)  # the same noise every step
        out = train._step(m, opt, (ids, P), obj, gen, balance, a, a.lr)
        losses.append(float(out["diff"]))
    balance.close()
    assert losses[-1] < 0.8 * losses[0], losses
    assert 0.9 < float(out["lb"]) < 8.0


# --------------------------------------------------------------------------------------
# Corpus, checkpoints and export
# --------------------------------------------------------------------------------------

_FILES = {
    "a.py": "def add(x, y):\n    return x + y\n" * 20,
    "pkg/b.py": "class Thing:\n    def __init__(self):\n        self.n = 0\n" * 20,
    "pkg/c.py": "import os\nprint(os.getcwd())  # é\n" * 20,
    "test/t.py": "assert True\n",
    "site-packages/s.py": "x = 1\n",
    "encodings/e.py": "x = 2\n",
}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A corpus built from a fake stdlib folder (every file trains: 0% held out,
    then the held-out split reuses the train stream)."""
    from cuda_backend import corpus

    root = tmp_path_factory.mktemp("stdlib")
    for rel, text in _FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "latin1.py").write_bytes(b"x = '\xe9'\n")  # not UTF-8: skipped
    out = tmp_path_factory.mktemp("corpus")
    meta = corpus.build(out, root=root, vocab_size=300, percent=0)
    (out / "heldout.npy").write_bytes((out / "train.npy").read_bytes())
    return out, meta


def test_corpus_files_and_tokenizer(corpus_dir):
    from mlx_diffgem.core.tokenizer import load_tokenizer

    out, meta = corpus_dir
    assert meta["train_files"] == ["a.py", "latin1.py", "pkg/b.py", "pkg/c.py"]
    tok = load_tokenizer(out)
    ids = tok.backend.encode(_FILES["pkg/c.py"], add_special_tokens=False).ids
    assert tok.decode(ids) == _FILES["pkg/c.py"]
    assert tok.backend.encode("x = 1").ids[0] == 2  # <bos> added, as Gemma's
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_ids) == (2, 0, [1])
    names = [tok.backend.id_to_token(i) for i in range(5)]
    assert names == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    stream = np.load(out / "train.npy")
    assert stream.dtype == np.uint16 and stream[0] == 2 and stream[-1] == 1
    assert (stream == 2).sum() == (stream == 1).sum() == 3


def test_stdlib_split_is_deterministic_and_disjoint():
    from cuda_backend import corpus

    files = corpus.source_files()
    train, held = corpus.split_files(files)
    # by file, not by position or order
    assert corpus.split_files(files[::-1]) == (train[::-1], held[::-1])
    assert not set(train) & set(held) and len(train) + len(held) == len(files)
    assert 0.02 < len(held) / len(files) < 0.10
    assert not any(corpus._excluded(f) for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)


def _tiny_args(corpus_dir, out, **kw):
    from cuda_backend.train import TrainArgs

    base = dict(
        out=str(out),
        data=str(corpus_dir),
        preset="tiny",
        canvas=C,
        batch=2,
        seq_len=40,
        warmup=0,
        min_lr_frac=1.0,  # a constant rate: the run length does not change it
        eval_every=1000,
        log_every=1000,
        ar_weight=0.1,
    )
    return TrainArgs(**{**base, **kw})


def test_resume_is_exact(corpus_dir, tmp_path, torch_mod):
    from cuda_backend import train

    torch = torch_mod
    data, _ = corpus_dir
    train.train(_tiny_args(data, tmp_path / "a", steps=4))
    train.train(_tiny_args(data, tmp_path / "b", steps=2))
    blob = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    args = dataclasses.replace(_tiny_args(data, tmp_path / "b"), steps=4)
    assert train.train(args, blob).step == 4
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def exported(corpus_dir, tmp_path_factory, torch_mod):
    from cuda_backend import train

    data, _ = corpus_dir
    run = tmp_path_factory.mktemp("run")
    train.train(_tiny_args(data, run, steps=2))
    return train.export(run, tmp_path_factory.mktemp("exported"))


def test_export_layout(exported):
    from mlx_diffgem.core.checkpoint import read_shapes

    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["text_config"]["layer_types"][-1] == "full_attention"
    assert "vision_config" in cfg and cfg["canvas_length"] == C
    names = read_shapes([exported / "model.safetensors"])
    assert all(
        n.startswith(("model.decoder.", "model.encoder.language_model.layers."))
        for n in names
    )
    assert "model.encoder.language_model.layers.0.layer_scalar" in names
    assert Path(exported, "tokenizer.json").is_file()
    assert Path(exported, "tokenizer_config.json").is_file()
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["t_max"] == 0.8 and gen["max_denoising_steps"] == 48


@needs_transformers
@needs_mlx
def test_export_loads_in_transformers_and_mlx(exported, torch_mod):
    from transformers import DiffusionGemmaForBlockDiffusion

    from mlx_diffgem.api import load, to_numpy

    torch = torch_mod
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(
        str(exported), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    model, tok = load(exported, backend="mlx")
    text = "def add(x, y):\n    return x\n"
    assert tok.decode(tok.encode(text)) == text
    rng = np.random.default_rng(0)
    V = hf.config.text_config.vocab_size
    ids, canvas = rng.integers(8, V, (1, 13)), rng.integers(0, V, (1, C))
    with torch.no_grad():
        want = hf(
            input_ids=torch.from_numpy(ids), decoder_input_ids=torch.from_numpy(canvas)
        ).logits.numpy()
    cache = model.new_cache(1)
    model.encode(ids.astype(np.int32), cache)
    got = to_numpy(model.decode(canvas.astype(np.int32), cache))
    diff = np.abs(got - want).max()
    assert diff < 1e-4, f"max diff {diff:.2e}"


def test_init_continues_an_exported_model(exported, corpus_dir, tmp_path, torch_mod):
    """--init: the run starts from the folder's weights (config from its config.json),
    and refuses a corpus encoded with another tokenizer."""
    from cuda_backend import corpus, train

    data, _ = corpus_dir
    # The exported run used this corpus' tokenizer: the same vocabulary passes.
    train.check_tokenizer(data, exported)
    state = train.load_weights(exported)
    args = _tiny_args(data, tmp_path / "init", steps=1, init=str(exported), lr=0.0)
    train.train(args)
    blob = torch_mod.load(tmp_path / "init" / "last.pt", weights_only=False)
    assert blob["config"] == json.loads((exported / "config.json").read_text())
    for k, v in state.items():  # lr 0: one step leaves the loaded weights as they are
        assert torch_mod.equal(blob["model"][k], v), k
    # the export keeps the sampler settings of the model it continued
    gen = json.loads((exported / "generation_config.json").read_text())
    sampler = dict(gen, t_max=0.375, t_min=0.1)
    (exported / "generation_config.json").write_text(json.dumps(sampler))
    try:
        again = train.export(tmp_path / "init", tmp_path / "again")
        assert json.loads((again / "generation_config.json").read_text()) == sampler
    finally:
        (exported / "generation_config.json").write_text(json.dumps(gen))

    other = tmp_path / "other"
    corpus.save_tokenizer(corpus.train_tokenizer(["zzz yyy"] * 50, 270), other)
    with pytest.raises(ValueError, match="differs from"):
        train.check_tokenizer(other, exported)


def test_time_budget_schedule_and_best_checkpoint(corpus_dir, tmp_path, torch_mod):
    from cuda_backend import train

    data, _ = corpus_dir
    a = _tiny_args(data, tmp_path, steps=100, warmup=10, minutes=1.0, min_lr_frac=0.1)
    assert train.progress(55, 0.0, a) == pytest.approx(0.5)  # by steps
    assert train.progress(20, 45.0, a) == pytest.approx(0.75)  # by time, further
    assert train.lr_at(5, a, 59.0) == pytest.approx(a.lr * 0.6)  # warmup first
    assert train.lr_at(20, a, 60.0) == pytest.approx(a.lr * 0.1)  # the end
    # A run stops when its time is spent, whatever the step budget.
    st = train.train(
        _tiny_args(data, tmp_path / "t", steps=10**6, minutes=1e-9, eval_every=1)
    )
    assert st.step == 1 and np.isfinite(st.best)
    out = train.export(tmp_path / "t", tmp_path / "best", which="best")
    assert (out / "model.safetensors").is_file()


def test_the_gpu_training_script_returns_a_loadable_model(corpus_dir, tmp_path):
    """cuda_backend/train_device.sh end to end on the CPU: the corpus unpacked from
    its archive, a few steps, the best checkpoint exported in bf16 and split into
    parts that the device tool can return, which reassemble into a model."""
    import subprocess
    import sys
    import tarfile

    from cuda_backend.backend import load

    data, _ = corpus_dir
    archive = tmp_path / "corpus.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(data, arcname="corpus")
    out = tmp_path / "out"
    env = dict(
        CORPUS=str(archive),
        OUT=str(out),
        WORK=str(tmp_path / "work"),
        DEVICE="cpu",
        PRESET="tiny",
        MINUTES="0",
        STEPS="3",
        BATCH="2",
        PY=sys.executable,
        TRAIN_ARGS=f"--seq-len 40 --canvas {C} --eval-every 2 --threads 1",
        PATH="/usr/bin:/bin",
        OMP_NUM_THREADS="1",
    )
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        ["bash", "cuda_backend/train_device.sh"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    parts = sorted(out.glob("model.tar.*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    blob = tmp_path / "model.tar"
    blob.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(blob) as tar:
        tar.extractall(tmp_path / "back", filter="data")
    folder = tmp_path / "back" / "device-model"
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    steps = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in steps if r["kind"] == "eval"] == [2, 3]
    assert "step 3/3" in (out / "train.log").read_text()
    assert "tok/s" in (out / "sample.txt").read_text()  # one completion ran
    target = load(folder, device="cpu", dtype="float32")
    assert target.config.canvas_length == C
