"""`monet atlas build`: route a corpus through a model once and store its expert atlas (what
each composite expert responds to) beside the profiles, under the model's identity, where
`monet serve` answers GET /experts from it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from masks.cli import ModelOpt, NamespaceOpt, StoreOpt, _errors, _load_model, _store, console

__all__ = ["atlas_app"]

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "monet_runtime" / "default_model"

atlas_app = typer.Typer(help="The expert atlas: each composite expert's top contexts, labels "
                        "and tokens.", no_args_is_help=True, pretty_exceptions_show_locals=False)


@atlas_app.command("build")
def build(
    corpus: Annotated[Path, typer.Argument(help="JSONL file or directory of label folders.")],
    model: ModelOpt = DEFAULT_MODEL,
    top_n: Annotated[int, typer.Option(min=1, max=256, help="Contexts kept per expert.")] = 16,
    top_tokens: Annotated[int, typer.Option(min=1, max=256, help="Tokens kept per expert.")] = 16,
    window: Annotated[int, typer.Option(min=1, max=512, help="Tokens of text either side of "
                                        "a context.")] = 32,
    max_length: Annotated[int, typer.Option(min=2, help="Tokens per routed window.")] = 512,
    out: Annotated[Path | None, typer.Option(help="Also write the atlas to this file.")] = None,
    device: str = "cpu",
    dtype: str = "float32",
    store: StoreOpt = None,
    namespace: NamespaceOpt = "monet:masks",
):
    """Build the atlas of MODEL over CORPUS and put it into the mask store."""
    from masks.atlas import atlas_name
    from masks.atlas_build import build_atlas

    with _errors():
        the_store = _store(store, namespace)
        loaded = _load_model(model, device, dtype)
        start = time.perf_counter()
        atlas = build_atlas(loaded, corpus, top_n=top_n, top_tokens=top_tokens, window=window,
                            max_length=max_length)
        data = atlas.to_bytes()
        built = time.perf_counter() - start
        if out is not None:
            out.write_bytes(data)
        name = atlas_name(atlas.model_id)
        digest = the_store.put_artifact(name, data)
        console.print(f"atlas {name}: {atlas.tokens:,} tokens of {atlas.documents:,} texts, "
                      f"{len(atlas.routing_layers)} routing layers x {atlas.num_experts ** 2:,} "
                      f"experts, {len(atlas.context_doc):,} contexts, {len(data) / 1e6:.1f} MB, "
                      f"built in {built:.1f} s; stored as {digest[:19]} in {the_store!r}")
