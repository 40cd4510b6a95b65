"""The project's one command line: `captioner`.

Serving commands come from app/cli.py (no torch); training commands from model_export/cli.py,
present when the training side is installed (the serving image leaves it out).
"""

from __future__ import annotations

import typer

cli = typer.Typer(help="Image captioning: train, export and evaluate a model bundle, and serve it.", no_args_is_help=True)


def _register() -> None:
    try:
        from app import cli as serving
    except ImportError:  # pragma: no cover - the serving side is always installed
        serving = None
    if serving is not None:
        for name, fn in getattr(serving, "COMMANDS", {}).items():
            cli.command(name)(fn)
    try:
        from model_export import cli as training
    except ImportError:  # the serving-only image has no training code
        return
    for name, fn in training.COMMANDS.items():
        cli.command(name)(fn)


_register()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
