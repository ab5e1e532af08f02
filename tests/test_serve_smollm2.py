"""`lora-tune serve` on the real SmolLM2-135M with two adapters: the same text as `lora-tune generate`,
adapters sharing one batch, and work stopped for clients that go away."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from serve_helpers import ServerProcess, random_adapter

from lora_tune.models import ensure_builtin

pytestmark = pytest.mark.slow
BASE = "builtin:smollm2-135m"
QUESTION = "Name three fruits that are red."


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    path = ensure_builtin("smollm2-135m", log=lambda *_: None)
    root = tmp_path_factory.mktemp("smol-adapters")
    return {
        name: random_adapter(path, root / name, seed, base_name=BASE, quantization="bf16", scale=0.3)
        for seed, name in enumerate(["one", "two"])
    }


@pytest.fixture(scope="module")
def server(adapters):
    srv = ServerProcess(["--adapter", f"one={adapters['one']}", "--adapter", f"two={adapters['two']}",
                         "--quantization", "fp32", "--max-batch", "4", "--no-jobs"])  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=300)


def ask(client, model: str, n: int = 24, question: str = QUESTION) -> str:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=n, temperature=0
    )
    return r.choices[0].message.content


def test_the_base_comes_from_the_adapters_and_greedy_text_equals_lora_tune_generate(client, adapters):
    assert [m.id for m in client.models.list()] == [BASE, "one", "two"]
    from click.testing import CliRunner

    from lora_tune.cli import main

    args = ["generate", "--adapter", str(adapters["one"]), "--prompt", QUESTION, "--max-new-tokens", "24",
            "--quantization", "fp32"]  # fmt: skip
    result = CliRunner().invoke(main, args)  # the command itself, in this process
    assert result.exit_code == 0, result.output[-2000:]
    served = ask(client, "one")
    assert served.strip() == result.stdout.strip() and len(served) > 20
    assert served != ask(client, BASE)


def test_two_adapters_and_the_base_in_one_batch(client, server):
    models = [BASE, "one", "two"]
    alone = {m: ask(client, m, 32) for m in models}
    assert len(set(alone.values())) == 3
    together: dict[str, str] = {}
    threads = [threading.Thread(target=lambda m=m: together.__setitem__(m, ask(client, m, 32))) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert together == alone
    s = httpx.get(f"{server.root}/stats").json()
    assert s["max_models_in_a_step"] == 3


def test_a_client_that_goes_away_stops_its_work(server):
    def stats():
        return httpx.get(f"{server.root}/stats").json()

    before = stats()["cancelled"]
    body = {"model": "two", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 400,
            "temperature": 0, "stream": True, "n": 2}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body, timeout=60) as r:
        next(r.iter_lines())
    server.wait_for(lambda: stats()["cancelled"] >= before + 2 and stats()["running"] == 0, timeout=10)
    with pytest.raises(httpx.ReadTimeout):  # a client that stops waiting for a non-streamed reply
        httpx.post(f"{server.url}/chat/completions", json={**body, "stream": False, "n": 1},
                   timeout=httpx.Timeout(60, read=0.5))  # fmt: skip
    server.wait_for(lambda: stats()["cancelled"] >= before + 3 and stats()["running"] == 0, timeout=10)
