"""GPU checks (issue 16): the CUDA paths the CPU suite cannot reach, sized for a short loan of one GPU.

- the engine in bfloat16 on CUDA, eager and compiled (CUDA graphs), writes the greedy text that
  float32 on the CPU writes with the shipped weights, or parts from it only at a near tie;
- the same seed gives the same text alone and in a full batch on CUDA, eager and compiled;
- training on CUDA: bf16 autocast with and without --compile, and --resume exactness with dropout
  (the CUDA RNG included);
- `torchrun --nproc_per_node 1 -m training` on CUDA, and train.py's DDP path over NCCL.

Every test needs CUDA and skips without it. Run: python -m pytest -m gpu tests/test_gpu.py -rsP
(scripts/gpu-check runs this file and bench/gpu.sh within one time budget). The tests import only
gpt/, training/ and service/engine.py, so they need torch, safetensors, tqdm, numpy, matplotlib (a
finished training run plots its losses) and pytest; no pydantic, no FastAPI. `-m training` imports
torchinfo, which its torchrun test stands in for when it is not installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

# Before cuBLAS starts: lets the resume test ask for deterministic kernels (cuBLAS needs a fixed
# workspace for that). It changes nothing else.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from gpt import SamplingParams, generate, load_checkpoint  # noqa: E402
from service.engine import Engine, Failed, Finished, GenerationRequest  # noqa: E402
from tests.conftest import CORPUS_PATH, NO_CORPUS  # noqa: E402
from tests.test_engine import outcome  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.train import RESUME_FILE, train  # noqa: E402

try:  # the service's default checkpoint; service.settings needs pydantic, which a bare GPU box may lack
    from service.settings import DEFAULT_CHECKPOINT as SHIPPED_CHECKPOINT
except ImportError:
    from bench.common import SHIPPED_CHECKPOINT

REPO = Path(__file__).resolve().parent.parent
DEVICE = torch.device("cuda")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs CUDA (a GPU): run scripts/gpu-check there")]

GREEDY = SamplingParams(temperature=0.0)
NEW_CHARS = 200
PROMPTS = ["CAESAR.\n", "BRUTUS.\nO", ""]  # prompt + 200 characters fit the shipped 256-character context
# bfloat16 keeps 8 bits of mantissa: on the CPU, the shipped model's logits in bfloat16 differ from
# float32 by up to 0.08 (mean 0.01) over these texts, and its float32 top-2 logits come as close as
# 0.002 apart. Greedy texts may therefore part where the two leading characters are within a few
# times that error; anywhere else a parting means a bug in the CUDA path.
NEAR_TIE = 0.25
ENGINE_ROWS = 8


@pytest.fixture(autouse=True)
def fresh_dynamo_caches() -> Iterator[None]:
    """Replaces conftest's per-test torch._dynamo.reset(): the compiled engine is built once for the
    module (its CUDA graphs take the longest to make), and a reset would make it compile again."""
    yield


@pytest.fixture(scope="module", autouse=True)
def reset_dynamo_after_module() -> Iterator[None]:
    yield
    torch._dynamo.reset()


# --- The engine on CUDA -------------------------------------------------------------------------

def start_engine(dtype: torch.dtype, compile: bool, device: torch.device = DEVICE,
                 warm_up_s: float = 300) -> Engine:
    checkpoint = load_checkpoint(SHIPPED_CHECKPOINT, device=device, dtype=dtype)
    engine = Engine(checkpoint.model, checkpoint.tokenizer, max_batch_size=ENGINE_ROWS,
                    max_queue=4 * ENGINE_ROWS, queue_timeout_s=600, compile=compile,
                    checkpoint_config=checkpoint.config, checkpoint_path=Path(SHIPPED_CHECKPOINT))
    engine.start()
    deadline = time.monotonic() + warm_up_s
    while not engine.ready:
        if not engine.alive:
            raise RuntimeError("the engine's scheduler died in warm-up") from engine._thread_error
        assert time.monotonic() < deadline, f"the engine did not warm up in {warm_up_s} s"
        time.sleep(0.01)
    return engine


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, Engine]]:
    """bfloat16 engines on CUDA, each made on first use and kept for the module: 'eager' and
    'compiled' (CUDA graphs). One that fails to start fails each test that asks for it, at once."""

    class Lazy(dict):
        failed: dict[str, BaseException] = {}

        def __missing__(self, mode: str) -> Engine:
            if mode in self.failed:
                raise RuntimeError(f"the {mode} engine did not start") from self.failed[mode]
            began = time.perf_counter()
            try:
                self[mode] = start_engine(torch.bfloat16, compile=mode == "compiled")
            except BaseException as error:
                self.failed[mode] = error
                raise
            print(f"{mode} engine warm-up: {time.perf_counter() - began:.1f} s")
            return self[mode]

    made = Lazy()
    yield made
    for engine in made.values():
        engine.shutdown()


def texts_of(engine: Engine, requests: list[GenerationRequest]) -> list[str]:
    """Submit the requests together (each gets a row at once while rows are free); their texts."""
    async def together() -> list[tuple[str, Finished | Failed]]:
        handles = [engine.submit(r) for r in requests]
        return await asyncio.gather(*(outcome(h) for h in handles))

    results = asyncio.run(asyncio.wait_for(together(), timeout=120))
    for _, end in results:
        assert isinstance(end, Finished), end
    return [text for text, _ in results]


@pytest.fixture(scope="module")
def cpu_float32() -> Any:
    """The shipped checkpoint in float32 on the CPU, and its greedy text for each prompt."""
    checkpoint = load_checkpoint(SHIPPED_CHECKPOINT)
    tok = checkpoint.tokenizer
    texts = ["".join(c.text for c in generate(checkpoint.model, tok.encode(p), tok.decode, NEW_CHARS, GREEDY))
             for p in PROMPTS]
    return checkpoint, texts


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_engine_bf16_greedy_text_is_cpu_float32_text_up_to_near_ties(
        mode: str, engines: dict[str, Engine], cpu_float32: Any) -> None:
    checkpoint, expected = cpu_float32
    tok, model = checkpoint.tokenizer, checkpoint.model
    engine = engines[mode]
    assert engine.device.type == "cuda" and engine.dtype == torch.bfloat16
    assert (engine.cache.compiled_step is not None) == (mode == "compiled")
    requests = [GenerationRequest(tok.encode(p), NEW_CHARS, GREEDY) for p in PROMPTS]
    actual = texts_of(engine, requests)

    for prompt, want, got in zip(PROMPTS, expected, actual, strict=True):
        assert len(got) == NEW_CHARS
        parted = next((i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), None)
        print(f"{mode} {prompt!r}: " + ("same 200 characters as float32 on the CPU" if parted is None
                                         else f"parts from float32 on the CPU at character {parted}"))
        if parted is None:
            continue
        # Up to `parted` both texts agree, so the CPU's float32 logits there are those of the same prefix.
        context = tok.encode(prompt) or [0]
        ids = torch.tensor([context + tok.encode(want[:parted])])
        with torch.no_grad():
            logits = model(ids)[0][0, -1]
        cpu_choice, gpu_choice = tok.encode(want[parted])[0], tok.encode(got[parted])[0]
        rank = int((logits > logits[gpu_choice]).sum()) + 1
        gap = float(logits[cpu_choice] - logits[gpu_choice])
        print(f"  float32 logits there: {want[parted]!r} {float(logits[cpu_choice]):.4f}, "
              f"{got[parted]!r} {float(logits[gpu_choice]):.4f} (gap {gap:.4f}, CUDA took float32's "
              f"choice number {rank})")
        assert gap <= NEAR_TIE, (
            f"{mode} bf16 on CUDA parts from float32 on the CPU at character {parted} of {prompt!r} "
            f"where float32's top two are not near-equal: CPU {want[parted]!r} vs CUDA {got[parted]!r}, "
            f"gap {gap:.4f} > {NEAR_TIE}\nCPU:  {want!r}\nCUDA: {got!r}")


def test_cuda_bf16_logits_are_within_bf16_error_of_cpu_float32(cpu_float32: Any) -> None:
    """The same weights over the CPU's greedy text (its last context's worth), teacher-forced: every
    logit on CUDA in bfloat16 within the near-tie tolerance of float32 on the CPU."""
    checkpoint, expected = cpu_float32
    tok = checkpoint.tokenizer
    cuda = load_checkpoint(SHIPPED_CHECKPOINT, device=DEVICE, dtype=torch.bfloat16).model
    for prompt, text in zip(PROMPTS, expected, strict=True):
        window = checkpoint.model.config.block_size
        ids = torch.tensor([((tok.encode(prompt) or [0]) + tok.encode(text))[-window:]])
        with torch.no_grad():
            want = checkpoint.model(ids)[0][0]
            got = cuda(ids.to(DEVICE))[0][0].float().cpu()
        difference = (want - got).abs()
        print(f"{prompt!r}: |bf16 CUDA - float32 CPU| logits max {float(difference.max()):.4f}, "
              f"mean {float(difference.mean()):.4f}")
        assert float(difference.max()) <= NEAR_TIE


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_same_seed_same_text_alone_and_in_a_full_batch_on_cuda(mode: str, engines: dict[str, Engine]) -> None:
    engine = engines[mode]
    tok = engine.tokenizer
    mine = GenerationRequest(tok.encode("BRUTUS."), 120, SamplingParams(temperature=0.9, top_k=30, seed=7))
    alone = texts_of(engine, [mine])[0]
    # Every row busy, with other lengths, settings and seeds around it (and a greedy row).
    others = [GenerationRequest(tok.encode("O" * n), 60 + 11 * n, SamplingParams(seed=n))
              for n in range(1, 4)]
    others += [GenerationRequest(tok.encode("Rome" * n), 90, SamplingParams(top_p=0.8, seed=100 + n))
               for n in range(1, 3)]
    others += [GenerationRequest(tok.encode("CASSIUS."), 150, GREEDY),
               GenerationRequest(tok.encode("ANTONY." * 20), 100, SamplingParams(temperature=1.2, seed=5))]
    batch = others[:3] + [mine] + others[3:]
    assert len(batch) == ENGINE_ROWS
    together = texts_of(engine, batch)
    assert len(alone) == 120
    assert together[3] == alone, f"{mode}: seed 7 alone {alone!r}\nin a full batch {together[3]!r}"


# --- Training on CUDA -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_text(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Path:
    """The first 20,000 characters of the play (data/julius_caesar.txt): 18,000 to train on."""
    path = tmp_path_factory.mktemp("corpus") / "short.txt"
    path.write_text(corpus_text[:20_000], encoding="utf-8")
    return path


def tiny_run(out: Path, data: Path, **overrides: Any) -> TrainConfig:
    settings = dict(out=str(out), preset="tiny", data=str(data), max_steps=8, eval_interval=4, batch_size=8,
                    lr=3e-3, dropout=0.1, device=DEVICE.type, seed=7)
    return TrainConfig(**(settings | overrides))


def last_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "last" / "model.safetensors")


def test_training_bf16_autocast_compiled_and_eager_on_cuda(tmp_path: Path, short_text: Path) -> None:
    """bf16 autocast on CUDA lowers the held-out loss, with and without --compile, and the two agree
    (without dropout, whose masks the compiled graph draws differently)."""
    eager = train(tiny_run(tmp_path / "eager", short_text, dropout=0.0))
    began = time.perf_counter()
    compiled = train(tiny_run(tmp_path / "compiled", short_text, dropout=0.0, compile=True))
    print(f"compiled training run (compile included): {time.perf_counter() - began:.1f} s")
    for result, out in ((eager, tmp_path / "eager"), (compiled, tmp_path / "compiled")):
        assert result.step == 8
        assert next(result.model.parameters()).device.type == "cuda"
        losses = [h["val_loss"] for h in result.history]
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.3, losses
        log = (out / "train.log").read_text()
        assert "on cuda x 1, autocast torch.bfloat16" in log
        assert load_checkpoint(out).config["training"]["step"] == 8
    print("held-out losses, eager:", [round(h["val_loss"], 4) for h in eager.history],
          "compiled:", [round(h["val_loss"], 4) for h in compiled.history])
    for e, c in zip(eager.history, compiled.history, strict=True):
        assert abs(e["val_loss"] - c["val_loss"]) < 0.05


def test_resume_on_cuda_continues_exactly_with_dropout(tmp_path: Path, short_text: Path) -> None:
    """8 steps straight vs 4, then --resume to 8, with dropout (masks drawn from the CUDA RNG).
    Deterministic kernels are asked for; where this GPU still has a nondeterministic one (two
    straight runs differ), the resumed run must differ from the straight one about as little as
    they do (mean over the weights)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        straight = train(tiny_run(tmp_path / "straight", short_text))
        again = train(tiny_run(tmp_path / "again", short_text))
        train(tiny_run(tmp_path / "split", short_text), stop_at=4)
        assert torch.load(tmp_path / "split" / RESUME_FILE, weights_only=True)["step"] == 4
        saved = torch.load(tmp_path / "split" / RESUME_FILE, weights_only=True)["config"]
        resumed = train(replace(TrainConfig(**saved), resume=True))
    finally:
        torch.use_deterministic_algorithms(False)

    assert resumed.step == straight.step == 8
    want, twin, got = (last_weights(tmp_path / name) for name in ("straight", "again", "split"))

    def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
        """max and mean |a - b| over all the weights"""
        flat = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        return float(flat.max()), float(flat.mean())

    noise, error = difference(want, twin), difference(want, got)
    final = (straight.history[-1], again.history[-1], resumed.history[-1])
    print(f"|weight difference| max, mean: straight vs straight {noise[0]:.3g}, {noise[1]:.3g}; straight "
          f"vs resumed {error[0]:.3g}, {error[1]:.3g}; "
          f"final held-out losses {[round(h['val_loss'], 6) for h in final]}")
    if noise[0] == 0:
        assert all(torch.equal(want[k], got[k]) for k in want)
        assert final[2]["val_loss"] == final[0]["val_loss"]
        assert final[2]["train_loss"] == final[0]["train_loss"]
    else:  # a dropout mask drawn afresh would move every weight, not a few by rounding
        assert error[1] <= 10 * noise[1]
    assert "Training resumed from the last checkpoint" in (tmp_path / "split" / "train.log").read_text()


# --- torchrun: one process, and train.py's DDP path over NCCL --------------------------------------

# One GPU cannot hold two NCCL ranks, and train.py wraps the model in DDP only when WORLD_SIZE > 1.
# This launcher starts a one-rank NCCL group first and counts the run as distributed while the group
# is up, so train.py's own DDP code (the wrap, gradient all-reduce, loss and RNG gathering, barriers)
# runs over NCCL on one GPU.
NCCL_LAUNCHER = """
import json, os, sys
import torch
import torch.distributed as dist
import training.train as loop
from training.config import TrainConfig

dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])))
loop.Distributed.enabled = property(lambda self: dist.is_initialized())
wrapped = []

class RecordingDDP(loop.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        wrapped.append(type(self.module).__name__)

loop.DistributedDataParallel = RecordingDDP
result = loop.train(TrainConfig(**json.loads(sys.argv[1])))
print("NCCL-CHECK " + json.dumps({"backend": dist.get_backend(), "wrapped": wrapped, "step": result.step}))
dist.destroy_process_group()
"""


def torchrun(args: list[str], log: Path, stub_dir: Path) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node 1 ARGS` (as python -m torch.distributed.run, which
    needs no torchrun on PATH), from the repository root, output to `log`."""
    env = dict(os.environ)
    paths = [str(REPO)]
    if importlib.util.find_spec("torchinfo") is None:
        # training/__main__.py imports torchinfo for --summary alone; a bare GPU box may not have it.
        stub_dir.mkdir(exist_ok=True)
        (stub_dir / "torchinfo.py").write_text(
            "def summary(*args, **kwargs):\n    raise RuntimeError('torchinfo stub: not installed')\n")
        paths.append(str(stub_dir))
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]
    with log.open("w") as output:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module", autouse=True)
def torchrun_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any] | None]:
    """Both torchrun runs start with the module and run beside the other tests (each is mostly
    process, CUDA and NCCL start-up); their tests, last, wait for them. None without the corpus,
    which fails those two tests alone."""
    if not CORPUS_PATH.is_file():
        yield None
        return
    root = tmp_path_factory.mktemp("torchrun")
    data = root / "short.txt"
    data.write_text(CORPUS_PATH.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    flags = ["--preset", "tiny", "--data", str(data), "--max-steps", "4", "--eval-interval", "2",
             "--batch-size", "8", "--lr", "3e-3", "--device", DEVICE.type]
    config = tiny_run(root / "nccl", data, max_steps=4, eval_interval=2).to_dict()
    (root / "launcher.py").write_text(NCCL_LAUNCHER)
    runs = {
        "module": (root / "module", torchrun(["-m", "training", "--out", str(root / "module"), *flags],
                                             root / "module.log", root / "stub")),
        "nccl": (root / "nccl", torchrun([str(root / "launcher.py"), json.dumps(config)],
                                         root / "nccl.log", root / "stub")),
    }
    yield {name: {"out": out, "process": process, "log": root / f"{name}.log"}
           for name, (out, process) in runs.items()}
    for _, process in runs.values():
        if process.poll() is None:
            process.kill()


def finished(run: dict[str, Any] | None, timeout_s: float = 120) -> str:
    if run is None:
        pytest.fail(NO_CORPUS, pytrace=False)
    try:
        code = run["process"].wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        run["process"].kill()
        code = f"killed after {timeout_s:g} s"
    output = run["log"].read_text()
    assert code == 0, f"torchrun exited with {code}:\n{output[-4000:]}"
    return output


def test_torchrun_one_process_on_cuda_writes_a_checkpoint(torchrun_runs: dict[str, Any]) -> None:
    run = torchrun_runs and torchrun_runs["module"]
    finished(run)
    checkpoint = load_checkpoint(run["out"])
    training = checkpoint.config["training"]
    assert training["step"] == 4 and training["world_size"] == 1
    assert training["command"].startswith("torchrun --nproc_per_node 1 -m training")
    assert (run["out"] / RESUME_FILE).is_file()
    assert "on cuda x 1, autocast torch.bfloat16" in (run["out"] / "train.log").read_text()


def test_ddp_over_nccl_trains_and_writes_a_checkpoint(torchrun_runs: dict[str, Any]) -> None:
    run = torchrun_runs and torchrun_runs["nccl"]
    output = finished(run)
    line = next(line for line in output.splitlines() if line.startswith("NCCL-CHECK "))
    report = json.loads(line.removeprefix("NCCL-CHECK "))
    assert report == {"backend": "nccl", "wrapped": ["GPT"], "step": 4}, report
    assert load_checkpoint(run["out"]).config["training"]["step"] == 4
