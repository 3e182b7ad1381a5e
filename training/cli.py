"""`monet corpus build` and `monet train`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

corpus_app = typer.Typer(help="Labelled code-and-prose corpora from this machine's files.",
                         no_args_is_help=True)


@corpus_app.command("build")
def corpus_build(
    out: Annotated[Path, typer.Argument(help="Output directory (train/valid/test .jsonl).")],
    max_chars: Annotated[int, typer.Option(help="Characters per label.")] = 4_000_000,
    chunk_chars: Annotated[int, typer.Option(help="Characters per text.")] = 1500,
):
    """Build the python / c / javascript / perl / english corpus (no downloads)."""
    from training.corpus import build_corpus

    manifest = build_corpus(out, max_chars_per_label=max_chars, chunk_chars=chunk_chars)
    typer.echo(manifest.to_json())
    if manifest.missing:
        typer.echo(f"missing on this machine: {', '.join(manifest.missing)}", err=True)


def train_command(
    corpus: Annotated[Path, typer.Option(help="Corpus directory from `monet corpus build`.")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory (resumed if it has state).")],
    steps: int = 3000,
    batch_size: int = 16,
    seq_len: int = 256,
    lr: float = 3e-3,
    routing_lambda: Annotated[float, typer.Option(
        help="Weight of the uniformity and ambiguity losses (the paper: 1e-3).")] = 1e-3,
    seed: int = 0,
    model_json: Annotated[str | None, typer.Option(
        help="JSON object of config fields overriding the default small model.")] = None,
    fresh: Annotated[bool, typer.Option(help="Ignore saved trainer state.")] = False,
):
    """Train a small MONET (LM loss + routing losses; AdamW, warm-up, cosine decay)."""
    from training.train import DEFAULT_MODEL, TrainConfig, train

    model = {**DEFAULT_MODEL, **(json.loads(model_json) if model_json else {})}
    cfg = TrainConfig(corpus=str(corpus), out=str(out), model=model, steps=steps,
                      batch_size=batch_size, seq_len=seq_len, lr=lr,
                      routing_lambda=routing_lambda, seed=seed)
    typer.echo(f"checkpoint: {train(cfg, resume=not fresh)}")


def languages_command(
    model: Annotated[Path, typer.Option(help="Checkpoint directory.")],
    corpus: Annotated[Path, typer.Option(help="Corpus directory from `monet corpus build`.")],
    out: Annotated[Path, typer.Option(help="Where the table and plots go.")] = Path("docs"),
    build_texts: Annotated[int, typer.Option(help="Training texts per language routed.")] = 100,
    eval_texts: Annotated[int, typer.Option(help="Held-out texts per language.")] = 30,
    coverages: Annotated[str, typer.Option(help="Coverage sweep, comma-separated.")] = "0.1,0.3,0.5",
):
    """The paper's section 5.2 here: a mask per language, its loss deltas, the trade-off."""
    from monet_runtime import load_model
    from training.languages import language_masks, write_report

    m = load_model(model)
    results = language_masks(m, corpus, build_texts=build_texts, eval_texts=eval_texts,
                             coverages=tuple(float(c) for c in coverages.split(",") if c))
    path = write_report(results, out, title=f"Language masks on {model.name}")
    for r in results:
        typer.echo(f"no-{r.language} [{r.criterion}{', chosen' if r.chosen else ''}]: target "
                   f"{r.target_delta:+.3f}, others {r.others_mean_delta:+.3f} ({r.ratio_text}) "
                   f"{'PASS' if r.passes() else 'below target'}")
    typer.echo(f"report: {path}")
