"""Helpers for the server tests: random-weight adapters, and `lora-tune serve` in a child process."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

from conftest import cli_process


def random_adapter(
    base_dir: Path | str,
    out: Path,
    seed: int,
    base_name: str | None = None,
    quantization: str = "fp32",
    targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "down_proj"),
    scale: float = 1.0,
) -> Path:
    """An adapter with random (non-zero) A and B, so it visibly changes the base's output; saved as
    training saves one, with a lora_tune.json naming its base and quantization."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    peft_model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out))
    meta = {"base_model": base_name or str(base_dir), "quantization": quantization, "steps": 0}
    (out / "lora_tune.json").write_text(json.dumps(meta))
    return out


class ServerProcess:
    """`lora-tune serve ... --port 0` in a child process; `url` is its /v1 base once it listens."""

    def __init__(self, args: list[str], timeout: float = 180.0):
        self.proc = cli_process(["serve", "--port", "0", *args])
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
        except Exception:
            self.proc.kill()
            self.proc.wait(timeout=10)
