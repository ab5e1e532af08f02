"""The dashboard on `lora-tune serve --runs-dir`: the run folders' API in process, and every page in a real
headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium; `make test` installs them
where it can, and these tests are skipped, saying so, where they are missing).

Screenshots of each page go to `docs/` when LORA_TUNE_SCREENSHOTS=docs is set (for the README), else to a
temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from rich.console import Console
from serve_helpers import ServerProcess
from test_preference import pair

from lora_tune.config import load_config
from lora_tune.server.dashboard.runs import RunsFolder, read_records, summarize
from lora_tune.train.loop import train

from conftest import chat, cli_process, tiny_overrides, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
KEY = "dashboard-test-key"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
BULK = 300  # run folders besides the real ones: the runs page must still appear in under a second


def _config(tmp: Path) -> Path:
    path = tmp / "empty.yaml"
    path.write_text("{}\n")
    return path


def _train_run(model_dir, files, out: Path, **extra) -> None:
    args = tiny_overrides(model_dir, *files, out, **{"train.max_steps": 8, "train.eval_every": 4, **extra})
    train(load_config(None, args), console=Console(quiet=True))


def _bulk_runs(root: Path, template: Path, n: int) -> None:
    """`n` finished-looking run folders (config, 100 logged steps, an adapter folder), dated in the past."""
    config = (template / "config.yaml").read_text()
    for i in range(n):
        run = root / f"sweep-{i:03d}"
        (run / "adapter").mkdir(parents=True)
        settings = config.replace("lr: 0.005", f"lr: {0.0001 * (i + 1):.4f}").replace("max_steps: 8", "max_steps: 100")
        (run / "config.yaml").write_text(settings)
        lines = [
            json.dumps({"step": s, "loss": 3 / s + i * 1e-3, "lr": 1e-4, "tokens_per_s": 1000.0 + i, "real_tokens": 99})
            for s in range(1, 101)
        ]
        lines.append(json.dumps({"split": "val", "step": 100, "loss": 0.05 + i * 1e-3}))
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        old = time.time() - 86400 * (2 + i / 10)
        for p in (run / "config.yaml", run / "metrics.jsonl"):
            os.utime(p, (old, old))


@pytest.fixture(scope="module")
def runs_dir(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    data = tmp_path_factory.mktemp("data")
    pairs = [(f"what is {i} plus {i}?", f"the answer is {2 * i}.") for i in range(24)]
    sft = (
        write_jsonl(data / "train.jsonl", [chat(q, a, "answer the question") for q, a in pairs[:20]]),
        write_jsonl(data / "val.jsonl", [chat(q, a, "answer the question") for q, a in pairs[20:]]),
    )
    prefs = (write_jsonl(data / "p.jsonl", [pair(i) for i in range(12)]), write_jsonl(data / "pv.jsonl", [pair(20)]))
    _train_run(tiny_model_dir, sft, root / "support-sft")
    _train_run(tiny_model_dir, sft, root / "support-sft-r8", **{"lora.r": 8, "train.lr": 2e-3})
    _train_run(tiny_model_dir, prefs, root / "support-dpo", **{"train.objective": "dpo"})
    _bulk_runs(root, root / "support-sft", BULK)
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------------------------
# in process


def test_statuses_come_from_the_folder(tiny_model_dir, tmp_path):
    files = (write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}", f"a{i}") for i in range(8)]), None)
    done = tmp_path / "done"
    _train_run(tiny_model_dir, files, done, **{"train.eval_every": 0})
    assert summarize(done).status == "finished" and summarize(done).steps == 8
    assert summarize(done).total_steps == 8
    killed = tmp_path / "killed"
    shutil.copytree(done, killed)
    shutil.rmtree(killed / "adapter")
    (killed / "status.json").write_text(json.dumps({"status": "running", "pid": 999999999}))
    assert summarize(killed).status == "interrupted"  # said "running", and its process is gone
    (killed / ".lock").write_text(f"pid={os.getpid()} host=here\n")
    assert summarize(killed).status == "running"  # a live process holds the lock
    (killed / ".lock").unlink()
    (killed / "status.json").write_text(json.dumps({"status": "failed", "error": "ValueError: bad"}))
    assert (summarize(killed).status, summarize(killed).error) == ("failed", "ValueError: bad")

    class Boom(Exception):
        pass

    from lora_tune.train.hooks import Hook

    class Explode(Hook):
        def on_step_end(self, run, out):
            if run.state.step == 2:
                raise Boom("disk on fire")

    failed = tmp_path / "failed"
    args = tiny_overrides(tiny_model_dir, *files, failed, **{"train.max_steps": 8})
    with pytest.raises(Boom):
        train(load_config(None, args), console=Console(quiet=True), hooks=[Explode()])
    row = summarize(failed)
    assert (row.status, row.steps) == ("failed", 2) and "disk on fire" in row.error


def test_runs_folder_is_cached_read_only_and_confined(runs_dir):
    before = _snapshot(runs_dir)
    folder = RunsFolder(runs_dir)
    rows = folder.summaries()
    again = folder.summaries()  # unchanged folders come from the cache (its speed: benchmarks/dashboard_speed.py)
    assert len(rows) == BULK + 3 and all(a is b for a, b in zip(rows, again, strict=True))
    by = {r.name: r for r in rows}
    assert by["support-dpo"].objective == "dpo" and by["support-sft"].best_val_loss is not None
    assert folder.folder("../etc") is None and folder.folder("support-sft/..") is None
    records, count = read_records(runs_dir / "support-sft" / "metrics.jsonl")
    assert count == len((runs_dir / "support-sft" / "metrics.jsonl").read_text().splitlines()) == len(records)
    assert read_records(runs_dir / "support-sft" / "metrics.jsonl", after=count) == ([], count)
    assert _snapshot(runs_dir) == before  # read only


def test_a_run_that_changes_is_summarized_again_and_only_it(runs_dir, tmp_path):
    for name in ("support-sft", "support-dpo"):
        shutil.copytree(runs_dir / name, tmp_path / name)
    folder = RunsFolder(tmp_path)
    rows = {r.name: r for r in folder.summaries()}
    metrics = tmp_path / "support-sft" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write(json.dumps({"step": 10**6, "loss": 0.5, "time": 1.0}) + "\n")
    fresh = {r.name: r for r in folder.summaries()}
    assert fresh["support-dpo"] is rows["support-dpo"] and fresh["support-sft"] is not rows["support-sft"]
    assert fresh["support-sft"].steps == 10**6


# ----------------------------------------------------------------------------------------------------
# in the browser


@pytest.fixture(scope="module")
def server(tiny_model_dir, runs_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("service")
    args = ["--model", str(tiny_model_dir), "--quantization", "fp32", "--device", "cpu", "--api-key", KEY]
    args += ["--adapter", f"support-sft={runs_dir / 'support-sft' / 'adapter'}", "--runs-dir", str(runs_dir)]
    args += ["--data-dir", str(data)]
    srv = ServerProcess(args, env={"LORA_TUNE_ALLOCATOR": "system"})
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser(server):
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        driver.get(server.url.removesuffix("/v1") + "/dashboard")
        driver.execute_script("localStorage.setItem('lora_tune_api_key', arguments[0])", KEY)
        yield driver
    finally:
        driver.quit()


def _shots() -> Path:
    where = os.environ.get("LORA_TUNE_SCREENSHOTS")
    out = ROOT / where if where else Path(os.environ.get("TMPDIR", "/tmp")) / "lora_tune-dashboard-shots"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _open(driver, server, fragment: str, timeout: float = 20):
    """Go to a dashboard page and wait until it has rendered; returns its console errors."""
    driver.get("about:blank")  # then a full load (only the hash changing would not reload the page)
    driver.get_log("browser")  # drop what came before
    driver.get(server.url.removesuffix("/v1") + "/dashboard#" + fragment)
    _wait(lambda: driver.execute_script("return document.body.dataset.ready") == "true", timeout, fragment)
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _wait(cond, timeout: float, what: str = ""):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


PAGES = {  # screenshots: these four here, the jobs and playground pages once they show something
    "runs": "/runs",
    "run": "/run/support-sft",
    "run-dpo": "/run/support-dpo",
    "compare": "/compare/support-sft,support-sft-r8",
    "jobs": "/jobs",
    "playground": "/playground",
}
SHOT_HERE = ("runs", "run", "run-dpo", "compare")


@pytest.mark.slow
@pytest.mark.browser
def test_every_page_renders_without_console_errors(browser, server):
    for name, fragment in PAGES.items():
        errors = _open(browser, server, fragment)
        assert errors == [], (name, errors)
        text = browser.find_element("id", "main").text
        assert "error" not in text.lower() or name == "run-dpo", (name, text[:300])
        if name in SHOT_HERE:
            browser.save_screenshot(str(_shots() / f"dashboard-{name}.png"))


@pytest.mark.slow
@pytest.mark.browser
def test_the_runs_page_lists_and_sorts_hundreds_of_runs(browser, server):
    _open(browser, server, "/runs")
    rows = browser.find_elements("css selector", "#runs tbody tr")
    assert len(rows) == BULK + 3
    assert int(browser.execute_script("return document.body.dataset.renderedMs")) >= 0  # its time: a benchmark
    newest = [r.get_attribute("data-run") for r in rows[:3]]  # sorted by start, newest first
    assert set(newest) == {"support-sft", "support-sft-r8", "support-dpo"}
    browser.find_element("css selector", 'th[data-key="best_val_loss"]').click()  # sortable
    rows = browser.find_elements("css selector", "#runs tbody tr")
    losses = [r.find_elements("css selector", "td")[7].text for r in rows[:5]]
    assert losses == sorted(losses, key=float)


@pytest.mark.slow
@pytest.mark.browser
def test_the_loss_curve_has_every_logged_step_and_grows_while_training(browser, server, tiny_model_dir, runs_dir):
    files = (write_jsonl(runs_dir.parent / "live.jsonl", [chat(f"q{i}", f"a{i}") for i in range(16)]), None)
    live = runs_dir / "live"
    more = {"train.max_steps": 150, "train.save_every": 0, "train.compile": False}
    overrides = tiny_overrides(tiny_model_dir, *files, live, **more)
    proc = cli_process(["train", str(_config(runs_dir.parent)), *overrides], LORA_TUNE_ALLOCATOR="system")
    try:
        _wait(lambda: len(read_records(live / "metrics.jsonl")[0]) >= 3 or proc.poll() is not None, 120, "steps")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        _open(browser, server, "/run/live")

        def points() -> int:  # read in the page at once: the chart is redrawn (replaced) as points come
            return int(browser.execute_script("return document.getElementById('loss-chart').dataset.points"))

        def status() -> str:
            return browser.execute_script("return document.getElementById('run-status').textContent")

        first = points()
        _wait(lambda: points() > first, 30, "the curve to grow")
        assert status() == "running"
        proc.communicate(timeout=300)
        assert proc.returncode == 0
        steps = [r for r in read_records(live / "metrics.jsonl")[0] if r.get("split", "train") == "train"]
        assert len(steps) == 150
        _wait(lambda: points() == len(steps), 15, "every step on the curve")
        _wait(lambda: status() == "finished", 15, "the finished status")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
@pytest.mark.browser
def test_the_run_page_shows_config_checkpoints_and_commands(browser, server, runs_dir):
    _open(browser, server, "/run/support-sft")
    assert "lora:" in browser.find_element("id", "config").text
    commands = browser.find_element("id", "commands").text
    assert f"lora-tune merge --run {(runs_dir / 'support-sft').resolve()}" in commands
    assert "lora-tune serve --adapter support-sft=" in commands
    records = read_records(runs_dir / "support-sft" / "metrics.jsonl")[0]
    chart = browser.find_element("id", "loss-chart")
    assert int(chart.get_attribute("data-points")) == len([r for r in records if r.get("split", "train") == "train"])
    assert int(chart.get_attribute("data-points1")) == len([r for r in records if r.get("split") == "val"])


@pytest.mark.slow
@pytest.mark.browser
def test_compare_overlays_both_runs_and_diffs_their_configs(browser, server):
    _open(browser, server, "/compare/support-sft,support-sft-r8")
    chart = browser.find_element("id", "compare-train")
    legend = [span.text for span in chart.find_elements("css selector", ".legend span")]
    assert legend == ["support-sft", "support-sft-r8"]
    assert int(chart.get_attribute("data-points0")) > 0 and int(chart.get_attribute("data-points1")) > 0
    diff = browser.find_element("id", "config-diff").text
    assert "lora.r" in diff and "train.lr" in diff and "output_dir" in diff
    assert "model.source" not in diff  # the same in both: not a difference


@pytest.mark.slow
@pytest.mark.browser
def test_the_playground_streams_a_reply_from_an_adapter(browser, server):
    _open(browser, server, "/playground")
    boxes = {b.get_attribute("value"): b for b in browser.find_elements("css selector", "input.model")}
    assert "support-sft" in boxes and len(boxes) == 2  # the base and the adapter, side by side
    for box in boxes.values():
        if not box.is_selected():
            box.click()
    browser.find_element("id", "max_tokens").clear()
    browser.find_element("id", "max_tokens").send_keys("24")
    browser.find_element("id", "prompt").send_keys("what is 3 plus 3?")
    browser.find_element("id", "send").click()
    answer = '[data-model="support-sft"] .answer'
    _wait(lambda: browser.find_elements("css selector", answer), 10, "the reply column")
    _wait(lambda: browser.find_element("css selector", answer).get_attribute("data-done") == "true", 60, "the reply")
    reply = browser.find_element("css selector", answer)
    assert int(reply.get_attribute("data-chunks")) > 1 and reply.text.strip()  # streamed, in pieces
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    browser.save_screenshot(str(_shots() / "dashboard-playground.png"))


@pytest.mark.slow
@pytest.mark.browser
def test_the_jobs_page_lists_a_job_and_its_events(browser, server, tmp_path):
    from openai import OpenAI

    client = OpenAI(base_url=server.url, api_key=KEY)
    lines = [chat(f"what is {i} plus {i}?", f"the answer is {2 * i}.") for i in range(12)]
    upload = tmp_path / "train.jsonl"
    upload.write_text("".join(json.dumps(r) + "\n" for r in lines))
    file = client.files.create(file=upload.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=client.models.list().data[0].id, training_file=file.id)
    _open(browser, server, "/jobs")
    row = browser.find_element("css selector", f'tr[data-job="{job.id}"]')
    row.find_element("css selector", "a").click()
    _wait(lambda: job.id in browser.find_element("id", "events").text, 10, "the job's events")
    browser.save_screenshot(str(_shots() / "dashboard-jobs.png"))
    client.fine_tuning.jobs.cancel(job.id)


@pytest.mark.slow
def test_dashboard_needs_the_key_but_its_page_does_not(server):
    import urllib.error
    import urllib.request

    base = server.url.removesuffix("/v1")
    assert urllib.request.urlopen(base + "/dashboard").status == 200  # the page holds no data
    assert urllib.request.urlopen(base + "/dashboard/static/app.js").status == 200
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/dashboard/api/runs")
    assert e.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/dashboard/static/../../config.yaml")
    assert e.value.code in (401, 404)
    request = urllib.request.Request(
        base + "/dashboard/api/runs/support-sft", headers={"Authorization": f"Bearer {KEY}"}
    )
    detail = json.loads(urllib.request.urlopen(request).read())
    assert detail["status"] == "finished" and detail["checkpoints"] and detail["adapter"].endswith("adapter")


def test_serve_refuses_a_missing_runs_dir_before_loading_a_model(tmp_path):
    from click.testing import CliRunner

    from lora_tune.cli import main

    missing = tmp_path / "nope"
    args = ["serve", "--model", str(tmp_path / "no-model-either"), "--runs-dir", str(missing), "--port", "0"]
    result = CliRunner().invoke(main, args)  # the command itself, in process
    assert result.exit_code == 1 and f"--runs-dir {missing} is not a folder" in result.output
