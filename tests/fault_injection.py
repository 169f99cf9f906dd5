"""Faults injected into the engine's stages for the requests whose prompt holds that stage's marker,
as a real failure of one request would strike: an exception inside the library call that handles it.

In the test's own process, `install()` patches gpt.generate. For the two-process server, the
test puts a `sitecustomize.py` on PYTHONPATH (see `sitecustomize_dir`) so that every Python process
of the server, the spawned engine process included, installs the same fault at start-up.
"""

from __future__ import annotations

import importlib
import os
import weakref
from pathlib import Path

generate = importlib.import_module("gpt.generate")  # the module (gpt.generate is also a function)


STAGES = ("sequence", "prefill", "sampling", "decode", "accept")
ENV = "CAESAR_TEST_FAULT"
AFTER_TOKENS = 3  # decode and accept faults strike once the request has generated this many tokens


class InjectedFault(RuntimeError):
    pass


def marker(stage: str) -> str:
    """What a prompt holds to fail at `stage` (characters of the play's vocabulary)."""
    return "QJQJ" + stage[:3]


def install() -> None:
    """Patch gpt.generate so that a request whose prompt holds marker(stage) fails at that stage."""
    marked: dict[str, weakref.WeakSet[generate.Sequence]] = {stage: weakref.WeakSet() for stage in STAGES}
    real_init, real_prefill = generate.Sequence.__init__, generate.prefill_rows
    real_sample, real_decode = generate.sample_rows, generate.decode_step
    real_accept = generate.Sequence.accept

    def init(seq, prompt_ids, *args, **kwargs):
        real_init(seq, prompt_ids, *args, **kwargs)
        prompt = seq.decode(prompt_ids)
        for stage in STAGES:
            if marker(stage) in prompt:
                if stage == "sequence":
                    raise InjectedFault("sequence")
                marked[stage].add(seq)

    def prefill_rows(model, cache, rows, prompts):
        if any(seq.row in rows for seq in marked["prefill"]):
            raise InjectedFault("prefill")
        return real_prefill(model, cache, rows, prompts)

    def sample_rows(logits, rows, top_n=0):
        if any(seq in marked["sampling"] for seq in rows):
            raise InjectedFault("sampling")
        return real_sample(logits, rows, top_n)

    def decode_step(model, cache, rows, tokens):
        if any(seq.row in rows and seq.generated >= AFTER_TOKENS for seq in marked["decode"]):
            raise InjectedFault("decode")
        return real_decode(model, cache, rows, tokens)

    def accept(seq, token, *args):
        if seq in marked["accept"] and seq.generated >= AFTER_TOKENS:
            raise InjectedFault("accept")
        return real_accept(seq, token, *args)

    generate.Sequence.__init__ = init
    generate.Sequence.accept = accept
    generate.prefill_rows, generate.sample_rows, generate.decode_step = prefill_rows, sample_rows, decode_step


def sitecustomize_dir(tmp_path: Path) -> Path:
    """A folder whose sitecustomize.py installs the faults where $CAESAR_TEST_FAULT is set."""
    folder = tmp_path / "fault-site"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import os\n"
        f"if os.environ.get({ENV!r}):\n"
        "    from tests import fault_injection\n"
        "    fault_injection.install()\n")
    return folder


def server_env(tmp_path: Path) -> dict[str, str]:
    """The environment for a server whose processes all carry the faults."""
    repo = Path(__file__).resolve().parent.parent
    path = os.pathsep.join([str(sitecustomize_dir(tmp_path)), str(repo), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path, ENV: "1"}
