"""`monet`: serve a MONET model, build and manage mask profiles, generate from the runtime.

Subcommands import what they need when they run, so `monet --help` starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from masks.cli import masks_app
from monet_cli.atlas import atlas_app
from monet_cli.checkpoint import checkpoint_app
from monet_cli.serve import serve_command
from training.cli import corpus_app, languages_command, train_command

app = typer.Typer(help="monet-serve: MONET models with per-request expert mask profiles.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
app.add_typer(masks_app, name="masks")
app.add_typer(atlas_app, name="atlas")
app.add_typer(corpus_app, name="corpus")
app.add_typer(checkpoint_app, name="checkpoint")
app.command("train")(train_command)
app.command("languages")(languages_command)
app.command("serve")(serve_command)

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "monet_runtime" / "default_model"


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    model: Annotated[Path, typer.Option(help="Checkpoint directory.")] = DEFAULT_MODEL,
    mask: Annotated[Path | None, typer.Option(help="Mask JSON file to apply.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 32,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    seed: int | None = None,
):
    """Generate with the plain-PyTorch runtime (no server)."""
    from monet_runtime import ExpertMask, GenerationRequest, SamplingParams, generate_batch, load_model

    m = load_model(model)
    params = SamplingParams(max_new_tokens=max_tokens, do_sample=temperature > 0,
                            temperature=temperature, seed=seed)
    request = GenerationRequest(m.tokenizer.encode(prompt), params,
                                ExpertMask.from_json(mask) if mask else None)
    result = generate_batch(m, [request], decode=m.tokenizer.decode)[0]
    typer.echo(prompt + result.text)


if __name__ == "__main__":
    app()
