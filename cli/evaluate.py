"""`ovseg eval ...`: zero-shot segmentation benchmarks."""

import typer

app = typer.Typer(help="Zero-shot segmentation mIoU on VOC, Context, COCO-Object, ADE20K or the synthetic world.", no_args_is_help=True)
