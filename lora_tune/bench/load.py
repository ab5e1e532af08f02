"""Load test for `lora-tune serve`: N concurrent clients over a fixed prompt set, against one at a time.

Each request streams (so the time to its first token is seen) through the official `openai` client and
asks for usage at the end. Counts and times are bounded: every request has a timeout, the whole phase
a deadline after which no new request starts.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROMPTS = [
    "Name three fruits that are red.",
    "What is the boiling point of water at sea level?",
    "Write one sentence about the ocean.",
    "Explain what a noun is to a child.",
    "Give two tips for a job interview.",
    "What does a thermometer measure?",
    "Suggest a name for a pet turtle.",
    "How many legs does a spider have?",
    "Describe the colour blue without using the word blue.",
    "Why do leaves change colour in autumn?",
    "What is the capital of Japan?",
    "List three things found in a kitchen.",
    "Write a short greeting for a birthday card.",
    "What is 12 times 12?",
    "Name a planet with rings.",
    "Give a synonym for happy.",
]


@dataclass
class Sample:
    """One request: which model, when it started, saw its first token and ended (seconds), tokens."""

    model: str
    start: float
    first: float | None
    end: float
    tokens: int
    error: str | None = None


def one_request(client, model: str, prompt: str, max_tokens: int) -> Sample:
    start, first, tokens = time.perf_counter(), None, 0
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # counted, not raised: a load test reports its errors
        return Sample(model, start, first, time.perf_counter(), tokens, f"{type(e).__name__}: {e}")
    return Sample(model, start, first, time.perf_counter(), tokens)


def run_phase(
    make_client, work: list[tuple[str, str]], clients: int, max_tokens: int, deadline_s: float = 600.0
) -> tuple[list[Sample], float]:
    """Send `work` ((model, prompt) pairs) from `clients` threads; returns (samples, wall seconds)."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for item in work:
        todo.put(item)
    samples: list[Sample] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + deadline_s

    def client_loop() -> None:
        client = make_client()
        while time.perf_counter() < stop_at:
            try:
                model, prompt = todo.get_nowait()
            except queue.Empty:
                return
            s = one_request(client, model, prompt, max_tokens)
            with lock:
                samples.append(s)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, stop_at - time.perf_counter()) + 60)
    return samples, time.perf_counter() - t0


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summarize(samples: list[Sample], wall: float) -> dict:
    ok = [s for s in samples if s.error is None]
    latency = [s.end - s.start for s in ok]
    ttft = [s.first - s.start for s in ok if s.first is not None]
    tokens = sum(s.tokens for s in ok)
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "error_examples": sorted({s.error for s in samples if s.error})[:3],
        "wall_s": wall,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "latency_p50_s": percentile(latency, 50),
        "latency_p95_s": percentile(latency, 95),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "samples": [asdict(s) for s in samples],
    }


def random_adapter(
    base_dir: Path | str,
    out: Path,
    seed: int,
    base_name: str | None = None,
    quantization: str = "fp32",
    targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "down_proj"),
    scale: float = 1.0,
) -> Path:
    """A rank-4 adapter with random (non-zero) A and B (B times `scale`), so it changes the base's output,
    saved as training saves one: weights, the base's tokenizer (if it has one), and a lora_tune.json
    naming its base and quantization. Serving cost depends on shapes only, so random weights measure it
    exactly."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    peft_model.save_pretrained(str(out))
    if (Path(base_dir) / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out))
    meta = {"base_model": base_name or str(base_dir), "quantization": quantization, "steps": 0}
    (out / "lora_tune.json").write_text(json.dumps(meta))
    return out


class ServerProcess:
    """`lora-tune serve ... --port 0` in a child process on 127.0.0.1; `url` is its /v1 base once it listens."""

    def __init__(self, args: list[str], timeout: float = 180.0, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lora_tune.cli", "serve", "--host", "127.0.0.1", "--port", "0", *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self._ready = threading.Event()
        self.url = ""
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=lambda: [self.log.append(x) for x in self.proc.stdout], daemon=True).start()
        if not self._ready.wait(timeout) or not self.url:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.log[-40:]))

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            found = re.search(r"listening on (http://\S+/v1)", line)
            if found:
                self.url = found.group(1)
                self._ready.set()
        self._ready.set()  # the process ended

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def wait_for(self, check, timeout: float = 30.0, every: float = 0.05):
        """Poll `check()` until it returns something truthy (bounded in time)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = check()
            if got:
                return got
            time.sleep(every)
        raise AssertionError(f"condition not met within {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
