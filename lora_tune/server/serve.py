"""`lora-tune serve`: load the base once, register the adapters, start the engine and uvicorn."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_tune.errors import LoraTuneError
from lora_tune.evaluate.run import ModelSpec, load_for_inference
from lora_tune.models import adapter_meta, is_4bit
from lora_tune.runtime import dtype_name
from lora_tune.server.adapters import AdapterSet, Served, find_adapter_folders
from lora_tune.server.app import Guard, Limits, create_app
from lora_tune.server.inference import Engine

DEFAULT_BASE = "builtin:smollm2-135m"
DEFAULT_DATA_DIR = "~/.local/share/lora_tune/service"


@dataclass
class ServeOptions:
    model: str | None = None  # default: the base the first adapter was trained on, else DEFAULT_BASE
    adapters: dict[str, Path] = field(default_factory=dict)
    adapters_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    quantization: str | None = None  # default: as the first adapter was trained, else bf16
    base_weights: str = "original"  # or "dequantized": 16-bit weights rounded as a 4-bit base had them
    device: str = "auto"
    cpu_dequantize: bool | str = "auto"  # a 4-bit base on the CPU: see models.choose_cpu_dequantize
    max_adapters: int = 8
    max_batch: int = 8
    max_queue: int = 64
    limits: Limits = field(default_factory=Limits)
    data_dir: Path | None = None  # the fine-tuning service's files, jobs and runs (None: no jobs API)
    runs_dir: Path | None = None  # run folders for the dashboard at /dashboard (None: no dashboard)


def _first_meta(opts: ServeOptions) -> dict:
    folders = list(opts.adapters.values())
    if opts.adapters_dir:
        folders += list(find_adapter_folders(opts.adapters_dir).values())
    for folder in folders:
        meta = adapter_meta(folder)
        if meta.get("base_model"):
            return meta
    return {}


def build(opts: ServeOptions, log=print) -> tuple[AdapterSet, int]:
    """Load the base model and register the adapters; returns (adapter set, context length)."""
    if opts.adapters_dir is not None and not opts.adapters_dir.is_dir():
        raise LoraTuneError(f"--adapters-dir {opts.adapters_dir} is not a folder; create it or fix the path")
    meta = _first_meta(opts)
    source = opts.model or meta.get("base_model") or DEFAULT_BASE
    quantization = opts.quantization or meta.get("quantization", "bf16")
    if opts.base_weights == "dequantized":
        trained = meta.get("quantization")
        if trained not in ("nf4", "fp4") or quantization in ("nf4", "fp4", "int8"):
            raise LoraTuneError(
                "--base-weights dequantized serves 4-bit-trained adapters on 16-bit weights: it needs an adapter "
                f"trained on nf4/fp4 (the first one found used {trained}) and --quantization bf16, fp16 or fp32"
            )
    log(f"loading {source} ({quantization})")
    model, tok, _ = load_for_inference(ModelSpec(source, None, quantization, opts.cpu_dequantize), opts.device)
    model.config.use_cache = True
    served = _served(model, quantization)
    if opts.base_weights == "dequantized":
        mcfg = (meta.get("config") or {}).get("model") or {}
        roundtrip_linear_weights(model, meta["quantization"], mcfg.get("double_quant", True))
        served = Served(
            quantization, meta["quantization"], f"{served.label} weights de-quantized from {meta['quantization']}"
        )
    adapters = AdapterSet(model, source, tok, served, opts.adapters, opts.adapters_dir, opts.max_adapters)
    for name in opts.adapters:  # named adapters are checked (and loaded) now; folder ones on first use
        adapters.acquire(name)
        adapters.release(name)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    return adapters, context


def _served(model, quantization: str) -> Served:
    if quantization in ("nf4", "fp4") and not is_4bit(model):  # model.cpu_dequantize on the CPU
        dtype = dtype_name(next(model.parameters()).dtype)
        return Served(quantization, quantization, f"{quantization} weights de-quantized once into {dtype}")
    if quantization in ("nf4", "fp4", "int8"):
        return Served(quantization, quantization, f"{quantization} ({'8' if quantization == 'int8' else '4'}-bit)")
    dtype = dtype_name(next(model.parameters()).dtype)
    label = dtype if dtype == quantization else f"{dtype} ({quantization} weights up-cast)"
    return Served(quantization, "original", label)


def roundtrip_linear_weights(model, quant_type: str, double_quant: bool) -> int:
    """Replace each linear weight that a 4-bit load quantizes (all but the output head) by its 4-bit
    round trip, so adapters trained on the 4-bit base see the values they were trained against.

    The weights are rounded from the dtype they were loaded in, as a 4-bit load rounds them.
    """
    from lora_tune.merge import nf4_roundtrip

    head, done = model.get_output_embeddings(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.weight.data = nf4_roundtrip(module.weight.data, quant_type, double_quant)
            done += 1
    return done


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(opts: ServeOptions, log=print) -> None:
    """Run the server until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    if opts.runs_dir is not None and not opts.runs_dir.is_dir():  # before minutes of loading, not after
        raise LoraTuneError(f"--runs-dir {opts.runs_dir} is not a folder; point it at the folder of your runs")
    family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((opts.host, opts.port))
        sock.listen(2048)  # connections wait in the backlog from now on, until uvicorn accepts them
    except OSError as e:
        raise LoraTuneError(f"can't listen on {opts.host}:{opts.port}: {e.strerror}; choose another --port") from None
    adapters, context = build(opts, log)
    jobs = None
    if opts.data_dir is not None:
        from lora_tune.server.jobs import Base, JobService

        jobs = JobService(
            opts.data_dir, Base(adapters.base_id, adapters.base_id, adapters.served.quantization), log=log
        )
        adapters.extra = jobs.served_models
        log(f"fine-tuning jobs: state in {opts.data_dir}")
    runs = None
    if opts.runs_dir is not None:
        from lora_tune.server.dashboard.runs import RunsFolder

        runs = RunsFolder(opts.runs_dir)
    engine = Engine(adapters, opts.max_batch, opts.max_queue)
    app = Guard(create_app(engine, adapters, opts.limits, context, jobs, runs), opts.limits)
    host, port = sock.getsockname()[:2]
    if not is_loopback(opts.host) and not opts.limits.api_key:
        log(f"warning: listening on {opts.host} without --api-key: anyone who can reach this machine can use it")
    names = ", ".join([adapters.base_id, *adapters.known()])
    log(f"models: {names}")
    where = f"http://{host if family == socket.AF_INET else f'[{host}]'}:{port}"
    if runs is not None:
        log(f"dashboard: {where}/dashboard (runs in {opts.runs_dir})")
    log(f"listening on {where}/v1  (Ctrl-C stops)")
    engine.start()
    if jobs is not None:
        jobs.start()
    try:
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3, lifespan="off")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.stop()
        if jobs is not None:
            jobs.stop()
