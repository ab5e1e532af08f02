"""`lora-tune`: thin click commands, each calling one library function."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from lora_tune.errors import LoraTuneError


def _fail(e: Exception) -> None:
    Console(stderr=True).print(f"[red]error:[/] {e}", highlight=False)
    sys.exit(1 if isinstance(e, LoraTuneError) else 2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora_tune")
def main() -> None:
    """Fine-tune an open LLM on one GPU (or a CPU) with LoRA / QLoRA."""


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="continue from the latest checkpoint in output_dir")
@click.option("--overwrite", is_flag=True, help="delete an existing run in output_dir first")
def train(config: str, overrides: tuple[str, ...], resume: bool, overwrite: bool) -> None:
    """Train a LoRA adapter: lora-tune train CONFIG.yaml [section.key=value ...]."""
    from lora_tune.config import load_config
    from lora_tune.train.loop import train as run

    try:
        cfg = load_config(config, overrides)
        run(cfg, resume=resume, overwrite=overwrite)
    except LoraTuneError as e:
        _fail(e)


@main.command()
@click.option("--output-dir", default="runs/demo", show_default=True, help="run directory")
@click.argument("overrides", nargs=-1)
def demo(output_dir: str, overrides: tuple[str, ...]) -> None:
    """QLoRA-tune the embedded SmolLM2-135M on a shipped sample and show a before/after answer."""
    from lora_tune.demo import run_demo

    try:
        run_demo(output_dir, overrides)
    except LoraTuneError as e:
        _fail(e)


@main.command("config-reference")
def config_reference() -> None:
    """Print every config key with its default and meaning (markdown)."""
    from lora_tune.config import reference

    click.echo("| key | default | meaning |\n|---|---|---|")
    for key, default, doc in reference():
        click.echo(f"| `{key}` | `{default}` | {doc} |")


if __name__ == "__main__":
    main()
