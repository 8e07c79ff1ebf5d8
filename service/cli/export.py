"""``hoverserve export qupath``: re-export a result's nucleus table without re-running the slide."""

from __future__ import annotations

import argparse

from service.cli import _args
from service.cli._errors import UsageError

__all__ = ["register"]


def _cmd_export_qupath(args: argparse.Namespace) -> int:
    import fsspec

    from worker.writers import export_qupath

    source_fs, source = fsspec.url_to_fs(args.table)
    if not source_fs.exists(source):
        raise UsageError(f"nucleus table not found: {args.table}")
    fs, root = fsspec.url_to_fs(args.out)
    written = export_qupath(source_fs, source, fs=fs, root=root, objects=args.objects,
                            measurements=args.measurements)
    if not args.quiet:
        print(f"wrote {written.total:,} {args.objects} to {args.out}/{written.names[0]} "
              f"({len(written.entries)} entr{'y' if len(written.entries) == 1 else 'ies'})")
    return 0


def register(sub: _args.Subparsers) -> None:
    """Add ``export qupath`` to the ``hoverserve`` parser."""
    export = sub.add_parser("export", help="re-export a result without re-running the slide")
    esub = export.add_subparsers(dest="export_command", required=True)
    p = esub.add_parser("qupath", help="a result's nucleus table → QuPath GeoJSON (one file to drag)")
    p.add_argument("table", help="nuclei.zarr.zip (as downloaded) or a nuclei.zarr directory")
    p.add_argument("--out", required=True, help="output directory or fsspec URL")
    p.add_argument("--objects", choices=_args.OBJECTS, default="detections",
                   help="QuPath object type (cells need a table with cell boundaries)")
    p.add_argument("--measurements", nargs="+", metavar="NAME",
                   help="measurement names to write, in this order (default: all in the table)")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    p.set_defaults(func=_cmd_export_qupath)
