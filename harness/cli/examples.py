"""`harness examples DIR`: write the shipped ablation files out of an installed copy, to run or adapt them.

The repository's `ablations/` is their source; the wheel build copies them into `harness/examples/`
(setup.py), and a checkout (or an editable install) reads `ablations/` itself.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from harness.cli.app import app, console
from harness.errors import HarnessError
from harness.tracking.uri import ensure_writable_dir

PACKAGE_DIR = "examples"
CHECKOUT_DIR = Path(__file__).resolve().parents[2] / "ablations"


def example_files() -> dict[str, bytes]:
    """File name → content of every shipped ablation file: the installed copies, else the checkout's."""
    packaged = resources.files("harness").joinpath(PACKAGE_DIR)
    if packaged.is_dir():
        found = {f.name: f.read_bytes() for f in packaged.iterdir() if f.name.endswith(".yaml")}
        if found:
            return dict(sorted(found.items()))
    if CHECKOUT_DIR.is_dir():
        return {p.name: p.read_bytes() for p in sorted(CHECKOUT_DIR.glob("*.yaml"))}
    raise HarnessError("this installation ships no example ablation files (harness/examples/ is missing)")


@app.command("examples")
def examples(
    directory: Annotated[Path, typer.Argument(help="where to write the ablation files (created if missing)")],
    force: Annotated[bool, typer.Option("--force", help="replace files of the same name that differ")] = False,
) -> int:
    """Write the shipped ablation files (quickstart.yaml, ...) into DIRECTORY."""
    files = example_files()
    ensure_writable_dir(directory, "harness examples")
    clashes = [n for n, data in files.items() if (directory / n).exists() and (directory / n).read_bytes() != data]
    if clashes and not force:
        raise HarnessError(f"{directory} already has different {', '.join(clashes)}: use --force to replace")
    for name, data in files.items():
        (directory / name).write_bytes(data)
    console.print(f"wrote {len(files)} ablation files to {directory}: {', '.join(files)}", highlight=False)
    console.print(f"try: harness run {directory / 'quickstart.yaml'}", highlight=False)
    return 0
