"""qwen-min against transformers + PEFT: LoRA training, forecast generation, decoding at batch 1
and loading.

    make bench                                   # the default run (about 17 min on 2 CPU cores)
    .venv/bin/python bench/bench.py --quick      # a smoke run in about 3 minutes
    .venv/bin/python bench/bench.py --only train,load --skip-hf
    .venv/bin/python bench/bench.py --only decode  # batch-1 decoding and its bound (~2 min)
    python3 bench/bench.py --device cuda --quick # on a GPU (bench/gpu.sh runs it there)
    .venv/bin/python bench/bench.py --tiny --quick --only train --modes eager,compiled
                                                 # a tiny random model: checks the script runs

Both sides get the full Qwen2.5-0.5B architecture, the same random weights and the same
inputs. The weights are written once, by transformers' save_pretrained in bf16 (as the
official checkpoint is stored), to --cache; both loaders read that folder.

  * train: one LoRA step (rank 8 on q_proj/v_proj, alpha 8, Adam, batch 4 × context 512):
    forward with the loss, backward, optimizer step. bf16 = bf16 autocast; fp32 = none.
    qwen-min keeps the frozen base in bf16 under autocast (LoRA tensors and Adam in fp32).
    transformers runs each bf16 setting it can (fp32 or bf16 weights under autocast) and the
    ratio is taken against its faster one. TFLOP/s and MFU use the FLOPs that flops.py counts
    (the coursework's rules: a training step is 3 × the forward pass), over the matmul peak
    this machine reaches in a large bf16 / fp32 matrix product, measured first.
  * eval: what evaluate.py does per batch: a left-padded ~700-token prompt, then 100 greedy
    tokens with the fp32 logits of every step (transformers: generate(output_scores=True)).
    Seconds per series, and the time for all 150 validation series at that batch size.
  * load: the checkpoint to a model that has produced its first logits (load_model against
    from_pretrained; the file is in the page cache).
  * decode: what a chat feels at batch 1, bf16 weights: a --decode-prompt-token prompt, then
    --decode-tokens greedy tokens with the cache on. qwen-min runs generate.py's `prefill`,
    then `decode_step` per token (what chat.py runs); transformers runs
    `generate` (greedy), and once more with oneDNN off, the kernel switch qwen-min makes at
    one row. Prefill tokens/s = prompt tokens / time to the first token; decode tokens/s =
    tokens after the first / the time they took; best of --decode-repeats runs. The bound
    beside it, measured in the same run: every weight read once per token plus the KV cache,
    over the bandwidth of a large copy (bytes read + bytes written). `--only decode` runs
    these rows alone (`make bench ONLY=decode`).

On a GPU (--device cuda) the same tables, and more rows: the training step at contexts 512 and
768, each implementation eager and compiled (qwen-min: qwen_min.compiled.CompiledTrainStep,
one graph replayed as CUDA graphs; transformers + PEFT: torch.compile(model) in its default
mode and with mode="reduce-overhead", CUDA graphs), the first (compiling) step's time, peak
GPU memory per row (torch.cuda.max_memory_allocated), and `e2e`: evaluate.py end to end on
150 validation series in a subprocess (random weights, simulated data; the checkpoint needs a
tokenizer.json: --tokenizer, or built offline from the test extras).

Every measurement runs in its own process, so its peak memory (the RSS high-water mark,
reset after loading for train) is its own. The machine is shared: before each measurement
the script waits for the CPUs to be idle, and each row reports the CPU time other processes
took while it ran ("others"); rerun rows where that is not near 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PAD_ID = 151643
QWEN25_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
    tie_word_embeddings=True, max_position_embeddings=32768,
)  # fmt: skip
TINY = QWEN25_05B | dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # --tiny: a smoke test
TARGETS = ("q_proj", "v_proj")
RANK = 8
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- the machine


def cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (0, 0 elsewhere)."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = fields[3] + fields[4]
    return sum(fields[:8]) - idle, sum(fields[:8])


def wait_for_idle(max_wait: float, threshold: float = 0.1) -> float:
    """Wait (up to max_wait s) until other processes use < threshold of the CPUs over 2 s;
    return the busy share last seen."""
    share, deadline = 1.0, time.time() + max_wait
    while True:
        b0, t0 = cpu_busy()
        time.sleep(2)
        b1, t1 = cpu_busy()
        share = (b1 - b0) / max(t1 - t0, 1)
        if share < threshold or time.time() > deadline:
            return share


class Timer:
    """Wall time, and the share of all CPUs that *other* processes used meanwhile."""

    def __enter__(self):
        self.usage0 = resource.getrusage(resource.RUSAGE_SELF)
        self.busy0, self.jiffies0 = cpu_busy()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        u0, u1 = self.usage0, resource.getrusage(resource.RUSAGE_SELF)
        own = (u1.ru_utime - u0.ru_utime) + (u1.ru_stime - u0.ru_stime)
        busy1, jiffies1 = cpu_busy()
        tick = os.sysconf("SC_CLK_TCK")
        ncpu = os.cpu_count() or 1
        others = (busy1 - self.busy0) / tick - own
        self.others = max(others, 0.0) / (self.seconds * ncpu) if jiffies1 > self.jiffies0 else 0


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ≥ 4.0): a later peak is the phase's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    """RSS high-water mark (VmHWM), or the process lifetime maximum where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def matmul_peak(dtype: torch.dtype, device: torch.device) -> float:
    """Best TFLOP/s of square matrix products (2n³ FLOPs) over a few sizes."""
    best, work = 0.0, 2e10 if device.type == "cpu" else 2e13
    sizes = (1024, 2048, 4096) if device.type == "cpu" else (4096, 8192)
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        reps = max(1, int(work / n**3))
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12)
    return best


def memory_bandwidth(device: torch.device, mib: int = 512) -> tuple[float, float]:
    """(copy, read) GB/s, best of 5: a copy of `mib` MiB into another tensor, counted as the
    bytes read plus the bytes written (2 × mib MiB); and a sum over `mib` MiB of fp32, read
    only. Both tensors are far larger than the caches, so memory serves every byte."""
    n = mib * 2**20
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    floats = torch.ones(n // 4, device=device)

    def best(f) -> float:
        f()
        times = []
        for _ in range(5):
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    return 2 * n / best(lambda: dst.copy_(src)) / 1e9, n / best(floats.sum) / 1e9


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued kernels, so a timer sees them run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> bool:
    """Start a phase's peak memory: the GPU allocator's on CUDA, else the process RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return reset_peak_rss()


def peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return peak_rss_gb()


# ----------------------------------------------------------------------------- workers


def write_checkpoint(path: Path, arch: dict) -> None:
    """Random Qwen2.5-0.5B weights (transformers' init, seed 0) in bf16, saved atomically."""
    import transformers

    cfg = transformers.Qwen2Config(**arch)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    os.replace(tmp, path)


def training_batch(batch: int, length: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    return ids, ids.clone(), torch.ones_like(ids)


def eval_batch(batch: int, prompt_len: int):
    """LLMTIME-like prompts (digits and ',', '.', ';'), left-padded to prompt_len: the first row
    is full, the others 1-20 tokens shorter, as series of different magnitudes are."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(11, 27, (batch, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, batch):
        mask[i, : 1 + (7 * i) % 20] = 0
    return ids.masked_fill(mask == 0, PAD_ID), mask


def load_ours(ckpt: Path, weights: str, device: torch.device):
    from qwen_min import load_model

    return load_model(ckpt, dtype=DTYPES[weights], device=device)


def load_hf(ckpt: Path, weights: str, device: torch.device):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=DTYPES[weights])
    return model.to(device).eval()


def add_lora(model, impl: str):
    """Rank 8, alpha 8 on q_proj/v_proj; returns the trainable parameters."""
    torch.manual_seed(0)
    if impl == "ours":
        from lora import apply_lora, lora_parameters

        apply_lora(model, RANK, RANK, TARGETS)
        return model, list(lora_parameters(model).values())
    import peft

    cfg = peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(TARGETS), lora_dropout=0.0)
    model = peft.get_peft_model(model, cfg)
    return model, [p for p in model.parameters() if p.requires_grad]


def train_step_fn(job: dict, model, params: list, device: torch.device):
    """The step to time: eager, or compiled (mode "compiled": inductor's default, CUDA graphs
    for qwen-min on CUDA; "cudagraphs": transformers with mode="reduce-overhead")."""
    impl, mode = job["impl"], job["mode"]
    optimizer = torch.optim.Adam(params, lr=1e-4, capturable=device.type == "cuda")
    ids, labels, mask = (t.to(device) for t in training_batch(job["batch"], job["context"],
                                                              job["vocab"]))
    if impl == "ours" and mode == "compiled":
        from qwen_min.compiled import CompiledTrainStep

        dtype = torch.bfloat16 if job["autocast"] else torch.float32
        step = CompiledTrainStep(model, optimizer, job["batch"], job["context"], device, dtype)
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        return lambda: step(batch, 1e-4)[0]
    if impl == "hf" and mode != "eager":
        model = torch.compile(model, mode="reduce-overhead" if mode == "cudagraphs" else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=job["autocast"])

    def step() -> float:
        with autocast:
            if impl == "ours":
                loss = model.loss(ids, labels, mask)
            else:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def work_train(job: dict) -> dict:
    impl, ckpt, device = job["impl"], Path(job["ckpt"]), torch.device(job["device"])
    model = (load_ours if impl == "ours" else load_hf)(ckpt, job["weights"], device)
    model, params = add_lora(model, impl)
    model.train()
    step = train_step_fn(job, model, params, device)
    reset = reset_peak(device)
    first = []  # the first step compiles (compiled modes); CUDA graphs record on later ones
    for _ in range(job["warmup"]):
        with Timer() as t:
            step()
        first.append(t.seconds)
    times, others, losses = [], [], []
    for _ in range(job["steps"]):
        with Timer() as t:
            losses.append(step())
        times.append(t.seconds)
        others.append(t.others)
    return {
        "seconds": times,
        "first_step": first[0] if first else None,
        "others": others,
        "loss": losses,
        "peak_gb": peak_gb(device),
        "peak_is_training_only": reset,
    }


def work_eval(job: dict) -> dict:
    impl, ckpt, device = job["impl"], Path(job["ckpt"]), torch.device(job["device"])
    model = (load_ours if impl == "ours" else load_hf)(ckpt, job["weights"], device)
    ids, mask = (t.to(device) for t in eval_batch(job["batch"], job["prompt"]))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=job["autocast"])

    def run(ids, mask, n: int) -> list[list[int]]:
        with torch.no_grad(), autocast:
            if impl == "ours":
                from qwen_min import generate

                tokens, logits = generate(model, ids, n, mask)
                assert logits.shape == (len(ids), n, job["vocab"])
                return tokens.tolist()
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                do_sample=False, output_scores=True, return_dict_in_generate=True,
                pad_token_id=PAD_ID,
            )  # fmt: skip
            assert len(out.scores) == n
            return out.sequences[:, ids.shape[1] :].tolist()

    run(ids[:1, :16], mask[:1, :16], 2)  # warm-up: first-call allocations, kernel choice
    reset = reset_peak(device)
    with Timer() as t:
        tokens = run(ids, mask, job["new_tokens"])
    return {
        "seconds": t.seconds,
        "others": t.others,
        "tokens": tokens,
        "peak_gb": peak_gb(device),
        "peak_is_generation_only": reset,
    }


def work_load(job: dict) -> dict:
    impl, ckpt, device = job["impl"], Path(job["ckpt"]), torch.device(job["device"])
    x = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18]], device=device)
    with Timer() as t:
        model = (load_ours if impl == "ours" else load_hf)(ckpt, job["weights"], device)
        sync(device)
    with Timer() as first, torch.no_grad():
        model(x) if impl == "ours" else model(input_ids=x)
        sync(device)
    return {
        "seconds": t.seconds,
        "first_logits": t.seconds + first.seconds,
        "others": t.others,
        "peak_gb": peak_gb(device),
    }


def work_e2e(job: dict) -> dict:
    """evaluate.py as a user runs it, in its own process: load, prompts, batched greedy
    forecasts, the teacher-forced pass, files. Wall time of the whole process."""
    out = Path(job["out"])
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--model", job["ckpt"], "--data",
           job["data"], "--limit", str(job["series"]), "--batch-size", str(job["batch"]),
           "--device", job["device"], "--out", str(out), "--ledger", str(out / "ledger.jsonl"),
           "--force"]  # fmt: skip
    with Timer() as t:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"evaluate.py failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"seconds": t.seconds, "others": t.others}


def chat_prompt(length: int, vocab: int) -> torch.Tensor:
    """(1, length) random ids below the special tokens (151643 on): a stand-in for a chat
    prompt, whose content does not change the work."""
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, min(vocab, PAD_ID), (1, length), generator=g)


def decode_ours(model, ids: torch.Tensor, n: int, stamps: list[float]) -> list[int]:
    """n greedy tokens through generate.py's prefill, then decode_step per token
    over the KV cache (the loop chat.py runs); the time after each is appended to `stamps`."""
    from qwen_min import KVCache
    from qwen_min.generate import cache_dtype, decode_step, prefill

    T = ids.shape[1]
    cache = KVCache(model.cfg, 1, T + n, cache_dtype(model, ids.device), ids.device)
    mask = torch.ones(1, T + n, dtype=torch.long, device=ids.device)
    logits = prefill(model, ids, mask[:, :T], cache, prefill_rows=1)  # (1, V)
    tokens = []
    for i in range(1, n + 1):
        token = logits.argmax(-1)  # (1,)
        tokens.append(int(token))  # waits for the device, as a streamed token would
        stamps.append(time.perf_counter())
        if i < n:
            logits = decode_step(model, token, mask[:, : T + i], cache)
    return tokens


def decode_hf(model, ids: torch.Tensor, n: int, stamps: list[float]) -> list[int]:
    """n greedy tokens of transformers' generate (cache on); its streamer stamps each."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:  # the first call hands over the prompt
                stamps.append(time.perf_counter())

        def end(self):
            pass

    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, streamer=Stamps(),
                         pad_token_id=PAD_ID)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def work_decode(job: dict) -> dict:
    impl, ckpt, device = job["impl"], Path(job["ckpt"]), torch.device(job["device"])
    model = (load_ours if impl == "ours" else load_hf)(ckpt, job["weights"], device)
    if not job["onednn"]:  # the whole run, prefill included: transformers has no per-row switch
        torch.backends.mkldnn.enabled = False
    ids = chat_prompt(job["prompt"], job["vocab"]).to(device)
    run = decode_ours if impl == "ours" else decode_hf
    best, others = None, []
    for r in range(1 + job["repeats"]):  # the first run warms up: allocations, kernel choice
        stamps = [time.perf_counter()]
        with torch.no_grad(), Timer() as t:
            tokens = run(model, ids, job["new_tokens"], stamps)
        if r == 0:
            continue
        others.append(t.others)
        prefill_s, decode_s = stamps[1] - stamps[0], stamps[-1] - stamps[1]
        best = best or {"prefill_s": prefill_s, "decode_s": decode_s}
        best = {"prefill_s": min(best["prefill_s"], prefill_s),
                "decode_s": min(best["decode_s"], decode_s)}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once
    return best | {"tokens": tokens, "others": others, "weight_bytes": weight_bytes}


WORKERS = {"train": work_train, "eval": work_eval, "load": work_load, "e2e": work_e2e,
           "decode": work_decode}


def worker_main(spec: str) -> None:
    job = json.loads(spec)
    if job["task"] == "checkpoint":
        write_checkpoint(Path(job["ckpt"]), job["arch"])
        result = {}
    else:
        torch.manual_seed(0)
        result = WORKERS[job["task"]](job)
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def noise(result: dict) -> float:
    """The largest share of the CPUs that other processes took during a timed section."""
    return max(result["others"]) if isinstance(result["others"], list) else result["others"]


def run_job(job: dict, wait: float, retries: int, log) -> dict:
    """Run one job in a fresh interpreter, after waiting for idle CPUs; its JSON result. A run
    that other processes slowed down (noise > 10%) is repeated, up to `retries` times, and
    the least disturbed one kept."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")  # fmt: skip
    best = None
    for _ in range(1 + retries):
        if job["task"] != "checkpoint":
            share = wait_for_idle(wait)
            if share >= 0.1:
                log(f"  (CPUs still {100 * share:.0f}% busy after waiting {wait:.0f} s)")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(
                f"benchmark job {job} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        result = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
        if job["task"] == "checkpoint":
            return result
        if best is None or noise(result) < noise(best):
            best = result
        if noise(best) < 0.1:
            break
        log(f"  (other processes took {100 * noise(result):.0f}% of the CPUs: measuring again)")
    return best


# ----------------------------------------------------------------------------- the report


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if x < 10**digits else f"{x:.0f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def train_settings(args, hf_weights: list[str], gpu: bool) -> list[tuple]:
    """(impl, precision, weights, autocast, mode) rows, each qwen-min row next to its
    transformers rows, so a slow drift of the machine's speed touches both sides of a ratio."""
    settings = []
    for mode in args.modes:
        if mode != "cudagraphs":  # qwen-min's compiled step already runs as CUDA graphs on CUDA
            settings.append(("ours", "bf16", "bf16", True, mode))
        settings += [("hf", "bf16", w, True, mode) for w in hf_weights]
    if not gpu:  # fp32 rows: what a CPU without fast bf16 runs
        settings.append(("ours", "fp32", "fp32", False, "eager"))
        settings += [("hf", "fp32", "fp32", False, "eager")] if hf_weights else []
    return settings


def train_table(args, cfg, L: int, peak: dict, hf_weights, job, mem: str, flops) -> list[str]:
    B, gpu = args.batch, args.device.startswith("cuda")
    step_flops = flops.train_step_flops(cfg, B, L, RANK, TARGETS)
    # the products a LoRA step executes: the forward's, and in the backward those that carry
    # the gradient to the inputs (frozen weights need no weight gradient); LoRA's own weight
    # gradients are < 0.1% more
    forward = flops.forward_flops(cfg, B, L, lora_rank=RANK, lora_targets=TARGETS, loss=True)
    step_matmuls = 2 * flops.matmul_subtotal(forward)
    kw = dict(batch=B, context=L, steps=args.steps, warmup=args.warmup)
    results = {}
    for impl, prec, weights, ac, mode in train_settings(args, hf_weights, gpu):
        results[impl, prec, weights, mode] = job("train", impl, weights, autocast=ac, mode=mode,
                                                 **kw)
    best = {}  # transformers' fastest setting per precision, whatever its mode
    for (impl, prec, _, _), r in results.items():
        r["s"] = min(r["seconds"])
        if impl == "hf":
            best[prec] = min(best.get(prec, math.inf), r["s"])
    rows = []
    for (impl, prec, weights, mode), r in sorted(results.items(),
                                                 key=lambda kv: kv[0][0] != "ours"):
        s = r["s"]
        name = "qwen-min" if impl == "ours" else "transformers + PEFT"
        ratio = f"**{best[prec] / s:.2f}×**" if impl == "ours" and prec in best else ""
        shown_mode = "compiled + CUDA graphs" if mode == "compiled" and impl == "ours" and gpu \
            else {"cudagraphs": "compiled + CUDA graphs"}.get(mode, mode)
        rows.append([
            name, prec, f"{weights} weights" + (" + autocast" if prec == "bf16" else ""),
            shown_mode, fmt(s), fmt(B * L / s), f"{step_flops / s / 1e12:.3f}",
            f"{100 * step_matmuls / s / 1e12 / peak[prec]:.0f}%", f"{r['peak_gb']:.2f}",
            fmt(r["first_step"]) if r["first_step"] is not None else "",
            f"{100 * noise(r):.0f}%", ratio,
        ])  # fmt: skip
    header = ["implementation", "precision", "setting", "mode", "s/step", "tokens/s",
              "TFLOP/s counted", "MFU", mem, "first step s", "others", "speed-up"]
    return [
        f"**LoRA training step** (batch {B} × context {L}, rank {RANK} on q_proj/v_proj, "
        f"Adam; best of {args.steps} steps after {args.warmup} warm-up, the first of which "
        f"compiles). TFLOP/s: the {step_flops / 1e12:.2f} TFLOP that flops.py counts per "
        f"step (3 × forward). MFU: the {step_matmuls / 1e12:.2f} TFLOP of matrix products "
        "the step must run (forward, and the input gradients: frozen weights need no weight "
        "gradient) over the measured peak. Peak memory: during the steps, weights included. "
        "Speed-up: against transformers' fastest row of the same precision.",
        "",
        *table(header, rows),
        "",
    ]


def decode_table(args, cfg, device: torch.device, job) -> tuple[list[str], str]:
    """The batch-1 decoding rows against the memory-bandwidth bound, and the closing note."""
    P, N = args.decode_prompt, args.decode_tokens
    kw = dict(prompt=P, new_tokens=N, repeats=args.decode_repeats)
    results = {"ours": job("decode", "ours", "bf16", onednn=True, **kw)}
    if not args.skip_hf:
        results["hf"] = job("decode", "hf", "bf16", onednn=True, **kw)
        results["hf, oneDNN off"] = job("decode", "hf", "bf16", onednn=False, **kw)
    wait_for_idle(args.wait_idle)
    copy_gbs, read_gbs = memory_bandwidth(device)
    # the bytes a bf16 decoder must read per token: every weight once (the tied embedding and
    # head once), and the keys and values of every earlier position, bf16, at the mean context
    # of the N tokens (positions P … P + N − 1)
    kv_bytes = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2 * (P + N / 2)
    per_token = results["ours"]["weight_bytes"] + kv_bytes
    bound, read_bound = copy_gbs * 1e9 / per_token, read_gbs * 1e9 / per_token
    rate = {k: (N - 1) / r["decode_s"] for k, r in results.items()}
    prefill = {k: P / r["prefill_s"] for k, r in results.items()}
    names = {"ours": "qwen-min (prefill + decode_step)", "hf": "transformers generate",
             "hf, oneDNN off": "transformers generate, oneDNN off"}
    rows = []
    for k, r in results.items():
        ratio = (f"**{rate['ours'] / rate[k]:.2f}×** / {prefill['ours'] / prefill[k]:.2f}×"
                 if k != "ours" else "")
        rows.append([names[k], fmt(prefill[k]), fmt(rate[k]), fmt(1000 / rate[k]),
                     f"{100 * rate[k] / bound:.0f}%", f"{100 * noise(r):.0f}%", ratio])
    lines = [
        f"**Decoding at batch 1** (bf16 weights, no autocast; a {P}-token prompt, then {N} "
        "greedy tokens with the KV cache; best of "
        f"{args.decode_repeats} runs after a warm-up run). Prefill: prompt tokens / time to "
        "the first token. Decode: the tokens after the first / their time. qwen-min/x: "
        "qwen-min's speed over this row's, decode / prefill. transformers with oneDNN off: "
        "torch.backends.mkldnn.enabled = False for the whole call (transformers has no "
        "one-row switch).",
        "",
        *table(["implementation", "prefill tok/s", "decode tok/s", "ms/token",
                "of the bound", "others", "qwen-min/x"], rows),
        "",
        f"Bound: {per_token / 1e6:.0f} MB read per token "
        f"({results['ours']['weight_bytes'] / 1e6:.0f} MB of bf16 weights, each once, the tied "
        f"embedding and head once; {kv_bytes / 1e6:.1f} "
        f"MB of bf16 keys and values at the mean context of {P + N / 2:.0f} positions) over "
        f"**{copy_gbs:.1f} GB/s**, the bandwidth of a 512 MiB copy counted as bytes read + "
        f"bytes written (2 × 512 MiB; the hardware may also read each destination line "
        f"before writing it, which is not counted, so the true bandwidth may be higher) = "
        f"**{bound:.1f} tokens/s**. A read-only pass (sum of 512 MiB of fp32) reached "
        f"{read_gbs:.1f} GB/s, a bound of {read_bound:.1f} tokens/s "
        f"(qwen-min at {100 * rate['ours'] / read_bound:.0f}% of it).",
        "",
    ]
    if "hf" in results:
        a, b = results["ours"]["tokens"], results["hf"]["tokens"]
        same = sum(x == y for x, y in zip(a, b))
        lines += [f"Greedy tokens: qwen-min and transformers agree on {same} of {len(a)}.", ""]
    note = (f"Decoding at batch 1: qwen-min {rate['ours']:.1f} tokens/s"
            + (f", transformers {rate['hf']:.1f} ({rate['ours'] / rate['hf']:.2f}×)"
               if "hf" in rate else "")
            + f"; bound {bound:.1f} tokens/s ({copy_gbs:.1f} GB/s copy), qwen-min at "
            f"{100 * rate['ours'] / bound:.0f}% of it.")
    return lines, note


def e2e_inputs(args, ckpt: Path, cache: Path, log) -> Path | None:
    """The checkpoint's tokenizer.json and a simulated data file for evaluate.py; None (and
    why, in the log) where no tokenizer can be had."""
    tokenizer = ckpt / "tokenizer.json"
    if args.tokenizer:
        shutil.copy(args.tokenizer, tokenizer)
    elif not tokenizer.exists():
        try:
            from tools.checkpoints import write_qwen2_tokenizer

            write_qwen2_tokenizer(tokenizer)
        except SystemExit as e:
            log(f"e2e skipped: no tokenizer.json ({e}); pass --tokenizer PATH")
            return None
    data_file = cache / "lotka_volterra_seed0.h5"
    if not data_file.exists():
        subprocess.run([sys.executable, str(ROOT / "data.py"), "--out", str(data_file),
                        "--seed", "0"], check=True, cwd=ROOT, capture_output=True)
    return data_file


def e2e_table(args, ckpt: Path, cache: Path, job, log) -> list[str]:
    data_file = e2e_inputs(args, ckpt, cache, log)
    if data_file is None:
        return ["**evaluate.py end to end**: skipped, no tokenizer.json (--tokenizer PATH)", ""]
    r = job("e2e", "ours", "bf16", data=str(data_file), series=args.series,
            batch=args.eval_batch, out=str(cache / "e2e-eval"))
    return [
        f"**evaluate.py end to end** on {args.series} validation series (simulated data, "
        "random weights; a fresh process: imports, load, prompts, forecasts, the "
        "teacher-forced pass, files)",
        "",
        *table(["batch", "series", "s end to end", "others"],
               [[str(args.eval_batch), str(args.series), fmt(r["seconds"]),
                 f"{100 * noise(r):.0f}%"]]),
        "",
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="training batch")
    p.add_argument("--context", type=int, default=512, help="training context length")
    p.add_argument("--steps", type=int, default=2, help="timed training steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--prompt", type=int, default=700, help="evaluation prompt length")
    p.add_argument("--new-tokens", type=int, default=100, help="greedy tokens per series")
    p.add_argument("--eval-batch", type=int, help="qwen-min's evaluation batch (default 50; "
                   "cuda: 150, one batch; also evaluate.py's in e2e)")
    p.add_argument("--hf-eval-batches", default="1,16,32", help="transformers' batches to try")
    p.add_argument("--series", type=int, default=150, help="validation series (projection)")
    p.add_argument("--decode-prompt", type=int, default=256, help="decode rows: prompt length")
    p.add_argument("--decode-tokens", type=int, default=64, help="decode rows: greedy tokens")
    p.add_argument("--decode-repeats", type=int, default=3, help="decode rows: timed runs")
    p.add_argument("--only", help="which parts, comma-separated (default: train,eval,decode,"
                   "load; cuda: train,eval,e2e,decode,load); --only decode: the batch-1 "
                   "decoding rows and their bound alone (about 2 min)")
    p.add_argument("--skip-hf", action="store_true", help="qwen-min only (no ratios)")
    p.add_argument(
        "--hf-weights",
        default="fp32,bf16",
        help="transformers' bf16-autocast settings to try: weight dtypes",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: context 128, 1 step, 24 new tokens, eval batch 4; cuda: context "
        "768, eager and compiled, bf16 only (aimed at ≤ 5 min; not yet measured)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (the GPU rows and tables)")
    p.add_argument("--contexts", help="training contexts (default: --context; cuda: 512,768)")
    p.add_argument("--modes", help="training modes: eager,compiled,cudagraphs (cudagraphs: "
                   "transformers only; default cpu: eager, cuda: all three)")
    p.add_argument("--tiny", action="store_true",
                   help="a 2-layer, 64-wide random model: checks the script, measures nothing")
    p.add_argument("--tokenizer", help="tokenizer.json for the e2e row (default: built from "
                   "the test extras, tools/checkpoints.py)")
    p.add_argument("--wait-idle", type=float, default=120, help="max s to wait for idle CPUs")
    p.add_argument("--retries", type=int, default=1, help="reruns of a row others slowed down")
    p.add_argument(
        "--cache",
        default="~/.cache/qwen-min/bench",
        help="where the random checkpoint is written once",
    )
    p.add_argument("--out", help="the tables (default bench/results.md; cuda: "
                   "bench/results-gpu.md; --only PARTS: bench/results-PARTS.md, e.g. "
                   "bench/results-decode.md; --tiny: runs/bench-tiny.md)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if args.quick and gpu:  # ≤ 5 min on one GPU: one context, bf16, two compiles
        args.contexts = args.contexts or "768"
        args.modes = args.modes or "eager,compiled"
        args.hf_weights, args.hf_eval_batches = "bf16", "1"
    elif args.quick:
        args.context, args.steps, args.new_tokens, args.eval_batch = 128, 1, 24, 4
        args.decode_tokens = 16
        args.hf_eval_batches = "1,4"
    if args.eval_batch is None:
        args.eval_batch = 150 if gpu else 50
    args.contexts = [int(c) for c in (args.contexts or ("512,768" if gpu else
                                                         str(args.context))).split(",")]
    args.modes = (args.modes or ("eager,compiled,cudagraphs" if gpu else "eager")).split(",")
    if not gpu and "cudagraphs" in args.modes:
        raise SystemExit("--modes cudagraphs needs --device cuda (CUDA graphs are GPU-only)")
    if "compiled" in args.modes or "cudagraphs" in args.modes:
        args.warmup = max(args.warmup, 3)  # compile, then CUDA graph warm-up and recording
    every = "train,eval,e2e,decode,load" if gpu else "train,eval,decode,load"
    part = args.only and set(args.only.split(",")) != set(every.split(","))
    args.only = args.only or every
    if args.out is None:  # a part (--only) never writes over the whole table
        args.out = ("runs/bench-tiny.md" if args.tiny else "bench/results"
                    + ("-gpu" if gpu else "") + ("-" + args.only.replace(",", "-") if part else "")
                    + ".md")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    import flops
    from qwen_min import Qwen2Config
    from qwen_min.runtime import atomic_write_text, pick_device

    device = pick_device(args.device)
    gpu = device.type == "cuda"
    mem = "peak GPU GB" if gpu else "peak RSS GB"
    only = set(args.only.split(","))
    hf_weights = [] if args.skip_hf else args.hf_weights.split(",")
    hf_batches = [int(b) for b in args.hf_eval_batches.split(",")]
    arch = TINY if args.tiny else QWEN25_05B
    cache = Path(args.cache).expanduser()
    ckpt = cache / ("tiny-random-seed0" if args.tiny else "qwen2.5-0.5b-random-seed0")
    started = time.time()
    out: list[str] = []

    def log(line: str = "") -> None:
        print(line, flush=True)

    if not (ckpt / "model.safetensors").exists():
        log(f"writing the random checkpoint to {ckpt} (once)")
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        run_job({"task": "checkpoint", "ckpt": str(ckpt), "arch": arch}, args.wait_idle, 0, log)

    def job(task: str, impl: str, weights: str, **kw) -> dict:
        spec = {"task": task, "impl": impl, "weights": weights, "ckpt": str(ckpt),
                "device": str(device), "vocab": arch["vocab_size"]} | kw
        desc = " ".join(f"{k}={v}" for k, v in spec.items() if k not in ("task", "ckpt"))
        log(f"{task}: {desc}")
        r = run_job(spec, args.wait_idle, args.retries, log)
        log(f"  -> {json.dumps({k: v for k, v in r.items() if k != 'tokens'})}")
        return r

    log("matmul peak ...")
    wait_for_idle(args.wait_idle)
    peak = {k: matmul_peak(v, device) for k, v in DTYPES.items()}
    cfg = Qwen2Config(**{k: v for k, v in arch.items() if k != "max_position_embeddings"})
    where = (f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} host CPUs" if gpu
             else f"{os.cpu_count()} CPUs")
    out += [
        f"Machine: {where}, torch {torch.__version__}; measured matmul peak "
        f"(square bf16 / fp32 products): **{peak['bf16']:.3f} / {peak['fp32']:.3f} TFLOP/s**."
        + (" **A tiny random model (--tiny): these numbers measure nothing.**"
           if args.tiny else ""),
        "",
    ]

    if "train" in only:
        for L in args.contexts:
            out += train_table(args, cfg, L, peak, hf_weights, job, mem, flops)

    if "eval" in only:
        P, N = args.prompt, args.new_tokens
        gen_flops = flops.generation_flops(cfg, 1, P, N)
        hf_eval_weights = "bf16" if "bf16" in hf_weights else (hf_weights or [None])[0]
        settings = [("ours", 1)] + ([("hf", 1)] if hf_weights else []) + [("ours", args.eval_batch)]
        settings += [("hf", b) for b in hf_batches if b != 1] if hf_weights else []
        results = {}
        for impl, b in dict.fromkeys(settings):
            w = "bf16" if impl == "ours" else hf_eval_weights
            kw = dict(batch=b, prompt=P, new_tokens=N, autocast=True)
            results[impl, b] = job("eval", impl, w, **kw)
        per_series = {k: r["seconds"] / k[1] for k, r in results.items()}
        hf_best = min((v for (impl, _), v in per_series.items() if impl == "hf"), default=None)
        rows = []
        for (impl, b), r in sorted(results.items(), key=lambda kv: kv[0][0] != "ours"):
            s = per_series[impl, b]
            all_series = math.ceil(args.series / b) * r["seconds"]
            # batch 1 against transformers at batch 1; a large batch against its best batch
            base = per_series.get(("hf", 1)) if b == 1 else hf_best
            ratio = f"**{base / s:.2f}×**" if impl == "ours" and base else ""
            rows.append([
                "qwen-min" if impl == "ours" else "transformers generate", str(b), fmt(s),
                fmt(all_series / 60), f"{gen_flops / s / 1e12:.3f}", f"{r['peak_gb']:.2f}",
                f"{100 * noise(r):.0f}%", ratio,
            ])  # fmt: skip
        out += [
            f"**Forecast evaluation** ({P}-token left-padded prompts + {N} greedy tokens "
            "with per-step fp32 logits, bf16 autocast; qwen-min bf16 weights, transformers "
            f"{hf_eval_weights} weights; one batch each, {args.series} series projected as "
            "⌈series / batch⌉ batches; speed-up: batch 1 against transformers at batch 1, "
            "the large batch against transformers' best batch)",
            "",
        ]
        out += table(
            [
                "implementation",
                "batch",
                "s/series",
                f"min for {args.series}",
                "TFLOP/s counted",
                mem,
                "others",
                "speed-up",
            ],
            rows,
        )
        ours_b = results.get(("ours", 1))
        hf_b = results.get(("hf", 1))
        if ours_b and hf_b:
            a, b = ours_b["tokens"][0], hf_b["tokens"][0]
            same = sum(x == y for x, y in zip(a, b))
            out += [
                "",
                f"Greedy tokens, batch 1: qwen-min and transformers agree on {same} of "
                f"{len(a)} (bf16 rounding may split near-ties on random weights).",
            ]
        out += [""]

    if "e2e" in only:
        out += e2e_table(args, ckpt, cache, job, log)

    note = None
    if "decode" in only:
        lines, note = decode_table(args, cfg, device, job)
        out += lines

    if "load" in only:
        rows = []
        settings = [("ours", "bf16"), ("ours", "fp32")]
        settings += [("hf", w) for w in ("bf16", "fp32")] if hf_weights else []
        for impl, w in settings:
            r = job("load", impl, w)
            rows.append(
                [
                    "load_model" if impl == "ours" else "from_pretrained",
                    w,
                    f"{r['seconds']:.2f}",
                    f"{r['first_logits']:.2f}",
                    f"{r['peak_gb']:.2f}",
                    f"{100 * noise(r):.0f}%",
                ]
            )
        out += [
            f"**Loading** the {'tiny' if args.tiny else '0.5B'} checkpoint (bf16 safetensors, "
            f"in the page cache) to {device}",
            "",
        ]
        out += table(
            ["loader", "to dtype", "load s", "to first logits s", mem, "others"], rows
        )
        out += [""]

    cmd = "python bench/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out += [f"Command: `{cmd.strip()}`; wall time {(time.time() - started) / 60:.1f} min."]
    out += ["", note] if note else []
    text = "\n".join(out) + "\n"
    log()
    log(text)
    atomic_write_text(args.out, text)
    log(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
