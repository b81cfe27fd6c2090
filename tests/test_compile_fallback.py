"""--compile auto, the default on CUDA, falls back to eager when torch.compile (or CUDA-graph
capture) fails, with one line saying why; --compile on still fails. On CPU, with an injected
failure: torch.compile hands back a function that raises, as a failed compile does on its
first call, and compile_wanted says yes, as it does on CUDA."""

from __future__ import annotations

import copy
import json
from argparse import Namespace

import numpy as np
import pytest
import torch

import data
import evaluate
import train
from lora import apply_lora, lora_parameters
from qwen_min import distributed, load_model

WHY = "RuntimeError: injected: no working C compiler"


def broken_compile(calls: list):
    def compile(fn, **options):
        def compiled(*args, **kwargs):
            calls.append(fn)
            raise RuntimeError("injected: no working C compiler\nmore lines of the log")
        return compiled
    return compile


@pytest.fixture
def failing_compile(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", broken_compile(calls))
    monkeypatch.setattr(train, "compile_wanted", lambda choice, device: choice != "off")
    monkeypatch.setattr(evaluate, "compile_wanted", lambda choice, device: choice != "off")
    monkeypatch.setattr(train, "use_compile_cache", lambda folder: folder)
    return calls


def lora_model(ckpt):
    torch.manual_seed(0)
    model = load_model(ckpt)
    apply_lora(model, rank=2)
    return model.train()


def test_train_step_falls_back_to_eager_under_auto(tiny, failing_compile, capsys):
    """The step that failed to compile runs eagerly; it and the next equal the eager step's
    loss and FLOPs, and the compiled function is not tried again."""
    model = lora_model(tiny[1])
    reference = copy.deepcopy(model)
    args = Namespace(compile="auto", ledger="unused/ledger.jsonl", batch_size=2,
                     context_length=16)
    world, cpu = distributed.World(), torch.device("cpu")
    batch = {"input_ids": torch.randint(0, 500, (2, 16)), "attention_mask": None}
    batch["labels"] = batch["input_ids"]

    def adam(m):
        return torch.optim.Adam(list(lora_parameters(m).values()), lr=1e-3)

    step = train.pick_step(args, model, adam(model), world, cpu, torch.float32)
    eager = train.pick_step(Namespace(**vars(args) | {"compile": "off"}), reference,
                            adam(reference), world, cpu, torch.float32)
    assert [step(batch, 1e-3) for _ in range(2)] == [eager(batch, 1e-3) for _ in range(2)]
    assert len(failing_compile) == 1
    assert capsys.readouterr().err == (
        f"warning: --compile auto: the compiled train step failed ({WHY}); continuing without "
        "compiling (pass --compile off to skip the attempt)\n")
    on = train.pick_step(Namespace(**vars(args) | {"compile": "on"}), model, adam(model), world,
                         cpu, torch.float32)
    with pytest.raises(RuntimeError, match="injected: no working C compiler"):
        on(batch, 1e-3)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """20 series of 10 steps whose prompts all have one length (no padding token, which is
    outside the tiny checkpoint's 512-token vocabulary)."""
    t = np.arange(10.0)
    one = np.stack([2 * t, np.full(10, 19.98)], axis=1)
    return data.write_h5(tmp_path_factory.mktemp("fallback") / "lv.h5",
                         np.repeat(one[None], 20, axis=0), t)


@pytest.mark.slow
def test_compiled_decoding_falls_back_to_eager_under_auto(tiny, series, failing_compile,
                                                          tmp_path, capsys):
    """Sampled, 2 batches of 1 series: the samples equal an eager run's, and the compiled
    function is tried once only. The failed attempt's prefill did run, so the ledger counts
    it too: more FLOPs than the eager run's."""
    def run(out: str, *flags: str) -> dict:
        argv = ["--model", str(tiny[1]), "--data", str(series), "--out", str(tmp_path / out),
                "--ledger", str(tmp_path / f"{out}.jsonl"), "--forecast-steps", "1",
                "--limit", "2", "--batch-size", "1", "--samples", "2", "--dtype", "fp32",
                "--device", "cpu", "--plot-series", "0", *flags]
        assert evaluate.main(argv) == 0
        return json.loads((tmp_path / out / "metrics.json").read_text())

    auto, off = run("auto", "--compile", "auto"), run("off", "--compile", "off")
    assert len(failing_compile) == 1
    # the line as it shows, after the progress bar that tqdm.write clears with a carriage return
    err = [line.rsplit("\r", 1)[-1] for line in capsys.readouterr().err.split("\n")]
    assert (f"warning: --compile auto: compiled decoding failed ({WHY}); continuing without "
            "compiling (pass --compile off to skip the attempt)") in err
    saved = [np.load(tmp_path / out / "forecasts.npz") for out in ("auto", "off")]
    assert np.array_equal(saved[0]["samples"], saved[1]["samples"], equal_nan=True)
    assert auto["crps_scaled"] == off["crps_scaled"]
    assert auto["flops"] > off["flops"]
    with pytest.raises(RuntimeError, match="injected: no working C compiler"):
        run("on", "--compile", "on")
