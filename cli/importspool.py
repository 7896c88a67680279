"""``smapq import-spool DIR``: import an FWTK smap spool (see smapq.report.importspool)."""

from __future__ import annotations

import sys

import click

from smapq.errors import SmapqError
from smapq.report import importspool as imp
from smapq.report.db import translated

from .common import State, pass_state
from .progress import Progress


@click.command("import-spool")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--imported-dir",
    metavar="DIR",
    help=f"where imported files are moved [default: DIR/{imp.IMPORTED_DIR}]",
)
@click.option("--dry-run", "-n", is_flag=True, help="parse and report, import and move nothing")
@click.option("--verbose", "-v", is_flag=True, help="one line per imported file too")
@click.option("--quiet", "-q", is_flag=True, help="no progress line, even on a terminal")
@pass_state
def import_spool_cmd(
    state: State,
    /,
    directory: str,
    imported_dir: str | None,
    dry_run: bool,
    verbose: bool,
    quiet: bool,
) -> None:
    """Import the complete, unlocked sma* files of an FWTK smap spool as received mail.

    Stop smap and smapd first. Each file is imported once (a re-run imports nothing
    twice) and moved to the imported directory; incomplete (mode 0600), locked or
    malformed files are reported and left where they are, and so is every recipient
    dropped for starting with '-' (as smapd did). The exit status is 1 if a malformed
    file was left.
    """
    with Progress("import-spool") as show, translated("queue database"):
        show.on = show.on and not quiet

        def report(r: imp.FileResult) -> None:
            if verbose or r.alert or r.status not in (imp.IMPORTED, imp.ALREADY):
                show.done()
                click.echo(r.line())

        counts = imp.import_spool(
            state.engine(),
            directory,
            target_dir=imported_dir,
            dry_run=dry_run,
            report=report,
            progress=lambda done, total: show(f"{done}/{total} files", done == total),
        )
    word = "would import" if dry_run else "imported"
    left = counts[imp.INCOMPLETE] + counts[imp.LOCKED] + counts[imp.MALFORMED]
    click.echo(
        f"import-spool: {word} {counts[imp.IMPORTED]}, already imported "
        f"{counts[imp.ALREADY]}, left {left} (incomplete {counts[imp.INCOMPLETE]}, "
        f"locked {counts[imp.LOCKED]}, malformed {counts[imp.MALFORMED]})",
        err=True,
    )
    sys.stdout.flush()
    if counts[imp.MALFORMED]:
        raise SmapqError(f"{counts[imp.MALFORMED]} malformed file(s) left in {directory}")
