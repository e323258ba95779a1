"""Side-by-side tables of reproductions recorded in MLflow (CODIS vs ALBEF, ablations).

    python -m flows.compare --recipe demo                  # the latest demo reproduction
    python -m flows.compare --recipe codis-4m --recipe albef-4m
    python -m flows.compare --runs <run id> <run id> --metrics 'retrieval.*' --out runs/cmp.md

A reproduction's parent run carries every variant's final metrics as ``<variant>/<metric>``;
each variant becomes a column. With one reproduction it is named by its variant; with several,
``<recipe>/<variant>``, and when that names two columns alike (the same recipe twice), every
column also gets its run's id prefix: ``demo/codis (84244072)``. Any other run becomes one column
of its own metrics, named after the run. With several runs a second table lists the parameters
that differ between them (``steps_scale``, ``overrides``, ...; not ``run_dir``, which always
does).

The tables are printed and saved as Markdown, with a CSV of the metrics beside it: at ``--out``,
else as ``comparison-<run id prefixes>.md`` in the first run's folder (its ``codis.run_dir`` tag:
the reproduction's ``runs/<recipe>-<run id>/``, whose own ``comparison.md`` it leaves alone), or
under ``runs/comparisons/`` when this machine does not have that folder. Comparing the same runs
again rewrites the same file; other runs never overwrite it.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from flows.tracking import resolve_tracking_uri

DEFAULT_METRICS = ("pretrain.ica_i2t", "pretrain.ica_t2i", "pretrain.itm", "pretrain.mlm",
                   "*.r_mean", "*.txt_r1", "*.img_r1", "*.accuracy")
"""Shown unless ``--metrics`` says otherwise: the pretraining losses that every mode computes
alike (the cross-modal contrastive terms, ITM, MLM) and each task's headline. Not the total
``pretrain.loss``: CODIS adds intra-modal and codebook terms to it, so its total is larger than
ALBEF's without meaning a worse model."""
UNCOMPARED_PARAMS = ("run_dir",)
"""Parameters that differ between any two reproductions by construction."""


def select_metrics(rows: Mapping[str, Mapping[str, float]], patterns: Sequence[str]) -> list[str]:
    """Metric names present in ``rows`` matching any glob pattern, in pattern order then by name."""
    present = sorted({name for metrics in rows.values() for name in metrics})
    chosen: list[str] = []
    for pattern in patterns:
        for name in present:
            if fnmatch.fnmatchcase(name, pattern) and name not in chosen:
                chosen.append(name)
    return chosen


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


def comparison_table(rows: Mapping[str, Mapping[str, float]], metrics: Sequence[str],
                     baseline: str | None = None) -> str:
    """A Markdown table: one column per row (variant / run), one line per metric; with
    ``baseline`` a column of differences (other - baseline) for each other row."""
    names = list(rows)
    others = [n for n in names if n != baseline] if baseline in rows else []
    headers = ["metric", *names, *(f"{n} - {baseline}" for n in others)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    for metric in metrics:
        values = [rows[n].get(metric) for n in names]
        deltas = []
        for name in others:
            a, b = rows[name].get(metric), rows[baseline].get(metric)  # type: ignore[index]
            deltas.append("-" if a is None or b is None else f"{a - b:+.4g}")
        lines.append("| " + " | ".join([metric, *map(_cell, values), *deltas]) + " |")
    return "\n".join(lines)


def comparison_csv(rows: Mapping[str, Mapping[str, float]], metrics: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["metric", *rows])
    for metric in metrics:
        writer.writerow([metric, *(rows[n].get(metric, "") for n in rows)])
    return out.getvalue()


def rows_from_runs(runs: Sequence[Any]) -> dict[str, dict[str, float]]:
    """Rows from MLflow runs: a reproduction parent run gives one row per variant (its
    ``<variant>/<metric>`` metrics), any other run one row named after it; named as the module
    docstring says."""
    several = len(runs) > 1
    named = [(name, run, values) for run in runs for name, values in _run_rows(run, several)]
    alike = len({name for name, _, _ in named}) < len(named)
    return {f"{name} ({_short(run)})" if alike else name: values for name, run, values in named}


def _run_rows(run: Any, several: bool) -> list[tuple[str, dict[str, float]]]:
    if run.data.tags.get("codis.kind") != "reproduction":
        return [(run.info.run_name or run.info.run_id, dict(run.data.metrics))]
    recipe = run.data.tags.get("codis.recipe", run.info.run_name)
    variants: dict[str, dict[str, float]] = {}
    for key, value in run.data.metrics.items():
        if "/" in key and not key.startswith("system/"):
            variant, metric = key.split("/", 1)
            variants.setdefault(variant, {})[metric] = value
    return [(f"{recipe}/{variant}" if several else variant, values)
            for variant, values in variants.items()]


def _short(run: Any) -> str:
    return run.info.run_id[:8]


def run_label(run: Any) -> str:
    return f"{run.info.run_name or run.info.run_id} ({_short(run)})"


def differences_table(runs: Sequence[Any]) -> str | None:
    """A Markdown table of the parameters whose values differ between ``runs`` (one column per
    run, "-" where a run lacks one), or None when none does."""
    names = sorted({name for run in runs for name in run.data.params} - set(UNCOMPARED_PARAMS))
    differing = [name for name in names
                 if len({run.data.params.get(name) for run in runs}) > 1]
    if not differing:
        return None
    headers = ["parameter", *map(run_label, runs)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    for name in differing:
        values = [run.data.params.get(name, "-") for run in runs]
        lines.append("| " + " | ".join([name, *values]) + " |")
    return "\n".join(lines)


def default_output(runs: Sequence[Any], runs_root: str | Path = "runs") -> Path:
    """Where a comparison of ``runs`` goes without ``--out`` (see the module docstring)."""
    name = "comparison-" + "-".join(_short(run) for run in runs) + ".md"
    folder = runs[0].data.tags.get("codis.run_dir")
    if folder and Path(folder).is_dir():
        return Path(folder) / name
    return Path(runs_root) / "comparisons" / name


def latest_reproduction(client: Any, recipe: str) -> Any:
    """The newest finished parent run of ``recipe`` across experiments."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(
        experiments, filter_string=f"tags.`codis.kind` = 'reproduction' and "
                                   f"tags.`codis.recipe` = '{recipe}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        raise LookupError(f"no finished reproduction of recipe {recipe!r} in MLflow")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.compare",
                                     description="Compare reproductions recorded in MLflow.")
    parser.add_argument("--runs", nargs="*", default=[], help="MLflow run ids")
    parser.add_argument("--recipe", action="append", default=[],
                        help="the latest finished reproduction of this recipe (repeatable)")
    parser.add_argument("--metrics", nargs="*", default=None,
                        help=f"glob patterns of metrics (default: {' '.join(DEFAULT_METRICS)})")
    parser.add_argument("--all", action="store_true", help="every metric")
    parser.add_argument("--baseline", default=None, help="row to show differences against")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                             "sqlite:///runs/mlflow.db)")
    parser.add_argument("--out", default=None,
                        help="Markdown file to write (a .csv is written beside it; default: "
                             "comparison-<run ids>.md in the first run's folder)")
    args = parser.parse_args(argv)
    if not args.runs and not args.recipe:
        parser.error("give --runs and/or --recipe")

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(args.tracking_uri, "runs"))
    runs = [client.get_run(run_id) for run_id in args.runs]
    try:
        runs += [latest_reproduction(client, recipe) for recipe in args.recipe]
    except LookupError as error:
        print(error, file=sys.stderr)
        return 1
    rows = rows_from_runs(runs)
    metrics = sorted({m for r in rows.values() for m in r}) if args.all else \
        select_metrics(rows, args.metrics or DEFAULT_METRICS)
    text = comparison_table(rows, metrics, baseline=args.baseline)
    if len(runs) > 1:
        differences = differences_table(runs)
        text += "\n\n## How the runs differ\n\n" + (
            differences or "They have the same parameters.")
    print(text)
    out = Path(args.out) if args.out else default_output(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    sources = ", ".join(f"{r.info.run_name} ({r.info.run_id})" for r in runs)
    out.write_text(f"# Comparison\n\nRuns: {sources}\n\n{text}\n", encoding="utf-8")
    out.with_suffix(".csv").write_text(comparison_csv(rows, metrics), encoding="utf-8")
    print(f"\nsaved: {out} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
