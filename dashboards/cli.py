"""The `longctx dashboards` subcommands: argparse wiring for export.py."""

from __future__ import annotations

import argparse


def add_dashboards_parser(commands) -> None:
    parser = commands.add_parser("dashboards", help="export the Grafana dashboards, or push them to a Grafana")
    actions = parser.add_subparsers(dest="dashboards_command", required=True)
    export = actions.add_parser("export", help="write one JSON file per dashboard")
    export.add_argument("directory", metavar="DIR")
    push = actions.add_parser("push", help="save the dashboards in a Grafana through its HTTP API")
    push.add_argument("--url", required=True, help="Grafana's base URL, e.g. http://grafana:3000")
    push.add_argument("--token", default=None, help="service-account token (Bearer); or user:password in --url")
    push.add_argument("--folder", default="longctx", help="folder title (default: longctx)")


def run_dashboards(args: argparse.Namespace) -> int:
    """Errors surface as ValueError / OSError, which the CLI prints as one line."""
    from grafana_client.client import GrafanaException

    from dashboards.export import export_dashboards, push_dashboards

    if args.dashboards_command == "export":
        for path in export_dashboards(args.directory):
            print(path)
        return 0
    try:
        saved = push_dashboards(args.url, args.token, folder=args.folder)
    except GrafanaException as error:
        detail = f"HTTP {error.status_code}: {error.message}" if error.status_code else error.message
        raise ValueError(f"Grafana at {args.url} refused the dashboards ({detail})") from None
    for url in saved:
        print(url)
    return 0
