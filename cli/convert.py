"""`ovseg convert ovsegmentor|groupvit|hf-groupvit SRC OUT`: published weights as ovseg checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer

app = typer.Typer(
    help="Turn published weights (official OVSegmentor and GroupViT checkpoints, transformers' GroupViT) into "
         "ovseg checkpoints for `ovseg eval`, `ovseg segment` and `ovseg train --init`. Reading a source never "
         "runs code from it.",
    no_args_is_help=True,
)

OUT_HELP = "The ovseg checkpoint to write (.pt)."
TOKENIZER_HELP = ("The tokenizer OUT carries: a transformers hub name (needs the network once, here) or a local "
                  "tokenizer folder. OUT keeps it, so `eval` and `segment` of OUT need no network.")


def _run(command: str, src: Path, convert: Callable[[], dict]) -> None:
    from ovseg.training.convert.common import ConvertError

    if not src.exists():
        typer.echo(f"ovseg convert {command}: {src} does not exist", err=True)
        raise typer.Exit(2)
    try:
        summary = convert()
    except ConvertError as error:
        typer.echo(f"ovseg convert {command}: {error}", err=True)
        raise typer.Exit(2)
    typer.echo(f"converted {summary['converted']} tensors from {src} (architecture from its "
               f"{summary.get('architecture_from', 'config')})")
    if summary["left_at_init"]:
        typer.echo(f"kept at their initial values ({len(summary['left_at_init'])}): "
                   + ", ".join(summary["left_at_init"][:8]) + (" ..." if len(summary["left_at_init"]) > 8 else ""))
    if summary.get("left_out"):
        typer.echo(f"left out of the source ({len(summary['left_out'])}): "
                   + ", ".join(summary["left_out"][:8]) + (" ..." if len(summary["left_out"]) > 8 else ""))


@app.command("ovsegmentor")
def ovsegmentor(
    src: Path = typer.Argument(..., help="An official OVSegmentor checkpoint (.pth, stage 1 or 2), or its 'model' state dict alone."),
    out: Path = typer.Argument(..., help=OUT_HELP),
    tokenizer: str = typer.Option("bert-base-uncased", "--tokenizer", help=TOKENIZER_HELP),
) -> None:
    """An official OVSegmentor checkpoint (github Jazzcharles/OVSegmentor) as an ovseg checkpoint.

    The architecture comes from the file's config, or from its tensor shapes when it holds the
    state dict alone (attention heads: the official 8 for the image encoder, hidden size / 64 for
    BERT). The entity-completion head maps onto the official decoder, so `ovseg train --init OUT`
    continues it; the momentum encoder (rebuilt from the image encoder in stage 2) and BERT's
    pooler are left out."""
    from ovseg.training.convert.official import convert_ovsegmentor

    _run("ovsegmentor", src, lambda: convert_ovsegmentor(src, out, tokenizer=tokenizer))


@app.command("groupvit")
def groupvit(
    src: Path = typer.Argument(..., help="An official GroupViT checkpoint (.pth), or its 'model' state dict alone."),
    out: Path = typer.Argument(..., help=OUT_HELP),
    tokenizer: str = typer.Option("nvidia/groupvit-gcc-yfcc", "--tokenizer", help=TOKENIZER_HELP + " GroupViT uses CLIP's BPE tokenizer."),
) -> None:
    """An official GroupViT checkpoint (github NVlabs/GroupViT) as an ovseg checkpoint.

    Two grouping stages (64 then 8 groups in the published models) and GroupViT's CLIP-style
    text transformer; the architecture comes from the file's config or its tensor shapes."""
    from ovseg.training.convert.official import convert_groupvit

    _run("groupvit", src, lambda: convert_groupvit(src, out, tokenizer=tokenizer))


@app.command("hf-groupvit")
def hf_groupvit(
    src: Path = typer.Argument(..., help="A transformers GroupViTModel folder (save_pretrained: config.json and weights)."),
    out: Path = typer.Argument(..., help=OUT_HELP),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP + " Default: the folder's own tokenizer."),
) -> None:
    """A transformers GroupViTModel folder as an ovseg checkpoint (the architecture from its config.json)."""
    from ovseg.training.convert.hf import convert_hf_groupvit

    _run("hf-groupvit", src, lambda: convert_hf_groupvit(src, out, tokenizer=tokenizer))
