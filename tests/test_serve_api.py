"""`lora-tune serve` over HTTP on 127.0.0.1, driven by the official `openai` client (tiny model)."""

from __future__ import annotations

import json
import shutil
import threading

import httpx
import openai
import pytest
from serve_helpers import ServerProcess, random_adapter

KEY = "test-key"
USER = [{"role": "user", "content": "what is 2 plus 2?"}]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    spare = tmp_path_factory.mktemp("spare")
    named = random_adapter(tiny_model_dir, root / "named", 0)
    (root / "dir").mkdir()
    random_adapter(tiny_model_dir, root / "dir" / "beta", 1)
    random_adapter(tiny_model_dir, root / "dir" / "gamma", 2, quantization="nf4")  # as if trained with QLoRA
    random_adapter(tiny_model_dir, spare / "delta", 3)
    return {"named": named, "dir": root / "dir", "spare": spare / "delta"}


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters):
    srv = ServerProcess([
        "--model", str(tiny_model_dir), "--adapter", f"alpha={adapters['named']}", "--adapters-dir",
        str(adapters["dir"]), "--api-key", KEY, "--max-adapters", "2", "--max-batch", "4", "--max-queue", "2",
        "--max-body-mb", "0.25", "--quantization", "fp32", "--device", "cpu", "--no-jobs",
    ])  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def stats(server) -> dict:
    return httpx.get(f"{server.root}/stats", headers={"Authorization": f"Bearer {KEY}"}).json()


def greedy(client, model, messages=USER, n=16, **kw):
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=n, temperature=0, **kw)
    return r.choices[0].message.content


def test_models_lists_the_base_and_every_adapter(client, server, tiny_model_dir):
    cards = {m.id: m for m in client.models.list()}
    assert set(cards) == {str(tiny_model_dir), "alpha", "beta", "gamma"}
    alpha = cards["alpha"].model_extra["lora_tune"]
    assert alpha["kind"] == "adapter" and alpha["trained_on"] == "fp32" and alpha["weights_as_trained"] is True
    assert cards["beta"].model_extra["parent"] == str(tiny_model_dir)
    gamma = cards["gamma"].model_extra["lora_tune"]  # a QLoRA adapter on 32-bit weights: said plainly
    assert gamma["trained_on"] == "nf4" and gamma["served_on"] == "fp32" and gamma["weights_as_trained"] is False
    base = client.models.retrieve(str(tiny_model_dir)).model_extra["lora_tune"]
    assert base == {"kind": "base", "served_on": "fp32", "context_length": 256}


def test_chat_with_and_without_streaming(client, server):
    r = client.chat.completions.create(model="alpha", messages=USER, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length") and text
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(
        model="alpha", messages=USER, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    ))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    raw = httpx.post(f"{server.url}/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "alpha", "messages": USER, "max_tokens": 4, "stream": True}).text  # fmt: skip
    assert raw.rstrip().endswith("data: [DONE]")


def test_max_tokens_is_capped_by_the_context(client):
    r = client.chat.completions.create(model="alpha", messages=USER, max_tokens=100_000, temperature=0,
                                       stop=None)  # fmt: skip
    # the tiny model's context is 256 tokens: the reply ends there (or at an end token) instead of failing
    assert r.usage.total_tokens <= 256 and (r.choices[0].finish_reason == "stop" or r.usage.total_tokens == 256)


def test_completions_several_prompts_and_choices(client, tiny_model_dir):
    r = client.completions.create(model="beta", prompt=["the quick", "hello"], max_tokens=6, n=2, temperature=0.9,
                                  seed=3)  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and r.object == "text_completion"
    again = client.completions.create(model="beta", prompt=["the quick", "hello"], max_tokens=6, n=2, temperature=0.9,
                                      seed=3)  # fmt: skip
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # a seed repeats
    streamed = client.completions.create(model="beta", prompt="the quick", max_tokens=6, temperature=0, stream=True)
    plain = client.completions.create(model="beta", prompt="the quick", max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_adapters_in_one_batch_each_give_their_own_output(client, server, tiny_model_dir):
    models = [str(tiny_model_dir), "alpha", "beta"]
    alone = {m: greedy(client, m, n=40) for m in models}
    assert len(set(alone.values())) == 3  # the adapters change the output
    before = stats(server)["steps"]
    together: dict[str, str] = {}
    threads = [threading.Thread(target=lambda m=m: together.__setitem__(m, greedy(client, m, n=40))) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    after = stats(server)
    assert after["max_models_in_a_step"] >= 2 and after["steps"] - before < 3 * 40  # rows shared forward passes


def test_a_new_adapter_folder_is_served_without_a_restart(client, server, adapters, tiny_model_dir):
    assert "delta" not in {m.id for m in client.models.list()}
    shutil.copytree(adapters["spare"], adapters["dir"] / ".delta.tmp")  # as an atomic save does
    (adapters["dir"] / ".delta.tmp").rename(adapters["dir"] / "delta")
    assert "delta" in {m.id for m in client.models.list()}
    assert greedy(client, "delta") != greedy(client, str(tiny_model_dir))
    assert len(stats(server)["adapters_loaded"]) <= 2  # --max-adapters 2: the least recently used went
    assert greedy(client, "beta") == greedy(client, "beta")


def test_auth_is_required_except_for_health(server):
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError) as err:
            openai.OpenAI(base_url=server.url, api_key=key or "x", max_retries=0).models.list()
        assert err.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/models").status_code == 401
    assert httpx.get(f"{server.root}/health").json()["status"] == "ok"


BAD = [
    ({"model": "nope", "messages": USER}, 404, "model"),
    ({"model": "alpha"}, 422, "messages"),
    ({"model": "alpha", "messages": []}, 422, "messages"),
    ({"model": "alpha", "messages": USER, "temperature": 5}, 422, "temperature"),
    ({"model": "alpha", "messages": USER, "max_tokens": 0}, 422, "max_tokens"),
    ({"model": "alpha", "messages": USER, "n": 100}, 422, "n"),
    ({"model": "alpha", "messages": [{"role": "robot", "content": "x"}]}, 422, "messages.0.role"),
    ({"model": "alpha", "messages": USER, "frobnicate": 1}, 400, "frobnicate"),
    ({"model": "alpha", "messages": USER, "logprobs": True}, 400, "logprobs"),
    ({"model": "alpha", "messages": USER, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": "alpha", "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "alpha", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ({"model": "alpha", "messages": [{"role": "user", "content": "the quick brown fox " * 80}]}, 400, "messages"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD, ids=[f"{s}-{p}" for _, s, p in BAD])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client, body, status, param):
    r = httpx.post(f"{server.url}/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
    assert greedy(client, "alpha", n=2)  # still serving


def test_bodies_that_are_not_json_or_too_large(server, client):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server.url}/chat/completions", headers=auth, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    big = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "x" * 300_000}]}).encode()
    r = httpx.post(f"{server.url}/chat/completions", headers=auth, content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no content-length: counted as it arrives
        for _ in range(40):
            yield b"x" * 10_000

    r = httpx.post(f"{server.url}/chat/completions", headers=auth, content=chunked())
    assert r.status_code == 413
    assert httpx.get(f"{server.url}/nowhere", headers=auth).json()["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)
    assert greedy(client, "alpha", n=2)


def test_a_full_queue_answers_503_with_retry_after(server, client):
    """--max-batch 4 --max-queue 2: eight requests of four sequences at once; the queue can't hold them all."""
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "gamma", "messages": USER, "max_tokens": 200, "temperature": 0, "n": 4}
    answers: list[httpx.Response] = []
    start = threading.Barrier(8)

    def send():
        start.wait()
        answers.append(httpx.post(f"{server.url}/chat/completions", headers=auth, json=body, timeout=120))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    refused = [r for r in answers if r.status_code == 503]
    assert len(answers) == 8 and refused and all(r.status_code == 200 for r in answers if r not in refused)
    assert refused[0].headers["retry-after"] == "1" and refused[0].json()["error"]["code"] == "overloaded"
    assert greedy(client, "gamma", n=2)
