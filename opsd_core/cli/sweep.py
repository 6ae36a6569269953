"""``opsd sweep`` and ``opsd compare``: many runs, one comparison report.

Owns: the two commands' arguments, checking ``--seeds`` and ``--jobs``, the sweep directory's
default place, and printing progress and failures.
Does not know: torch; each run is its own ``opsd run`` process (``opsd_core.sweep``), and the
report is built by ``diagnostics.comparison``.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from opsd_core.errors import ConfigError


def _check_jobs(jobs: int, cores: int) -> None:
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: run at least 1 job at a time")
    if jobs > cores:
        raise ConfigError(
            f"--jobs {jobs}: this machine gives the sweep {cores} cores and each run needs at least one thread; "
            f"use --jobs {cores} or fewer"
        )


@click.command("sweep")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2,...",
              help="A config field and its values (TOML literals, as for --set; commas inside [...] or quotes "
              "belong to a value). Repeatable: the sweep runs every combination.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Override a config value of every run (before the grid's values). Repeatable.")
@click.option("--seeds", metavar="S1,S2,...", help="Seeds (run.seed) of every grid point. Default: the config's run.seed.")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="Runs at the same time, each an `opsd run` process with run.threads = cores // jobs "
              "(or less: --set run.threads=N caps it).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="The sweep directory. Default: run.output_dir/<run.name>-sweep of CONFIG.")
def sweep_command(
    config_path: str, grid: tuple[str, ...], overrides: tuple[str, ...], seeds: str | None, jobs: int, out_dir: str | None
) -> None:
    """Run CONFIG at every combination of the --grid values, for each seed, and compare the runs.

    Every grid point's config is validated before any run starts. Each run is `opsd run` in
    its own directory under the sweep directory, named after its grid point and seed
    (e.g. divergence.top_k=4_seed=0), with its output in logs/NAME.log; sweep.json records the
    grid, the command and each run's status. Run the same command again to resume an
    interrupted sweep: finished runs are skipped, started ones continue with `opsd run --resume`.
    At the end, sweep.md, the report of sweep.json and the PNG plots compare the grid points:
    mean and standard error over seeds of each phase's student accuracy, gain, gap closure, KL
    and answer lengths, and the gap closure against each grid key.
    """
    from opsd_core.config import load_config
    from opsd_core.diagnostics.comparison import read_runs, summarise, write_comparison
    from opsd_core.rundir import RunDirectory
    from opsd_core.sweep import (
        finished_runs,
        hold_sweep,
        open_sweep,
        parse_seeds,
        usable_cores,
    )

    config = load_config(config_path, overrides)
    chosen_seeds = parse_seeds(seeds) if seeds is not None else (config.run.seed,)
    cores = usable_cores()
    _check_jobs(jobs, cores)
    threads = cores // jobs if config.run.threads is None else min(config.run.threads, cores // jobs)
    directory = Path(out_dir) if out_dir else Path(config.run.output_dir) / f"{config.run.name}-sweep"
    if RunDirectory(directory).holds_run():
        raise ConfigError(f"--out {directory}: it is a run directory (it holds config.toml); choose another --out")
    command = shlex.join([
        "opsd", "sweep", config_path, *(part for item in overrides for part in ("--set", item)),
        *(part for item in grid for part in ("--grid", item)),
        "--seeds", ",".join(map(str, chosen_seeds)), "--jobs", str(jobs), "--out", str(directory),
    ])  # fmt: skip
    sweep = open_sweep(Path(config_path), grid, chosen_seeds, overrides, directory, command)
    click.echo(f"Sweep directory: {directory} ({len(sweep.runs)} runs, {jobs} at a time, {threads} threads each)")
    with hold_sweep(directory):
        statuses = sweep.execute(jobs, threads, echo=click.echo)
        finished = finished_runs(sweep)
        runs, keys = read_runs([directory / run.name for run in finished], [axis.key for axis in sweep.axes])
        report = summarise(runs, keys)
        failed = [name for name, status in statuses.items() if status["status"] != "finished"]
        notes = [f"Not finished (see logs/): {', '.join(f'`{name}`' for name in failed)}."] if failed else []
        path = write_comparison(directory, report, notes)
        sweep.write_manifest(statuses, report)
    click.echo(f"Report: {path} (the sweep has run {sweep.wall_s:.0f} s)")
    if failed:
        raise click.ClickException(
            f"{len(failed)} of {len(sweep.runs)} runs did not finish ({', '.join(failed)}); their output is in "
            f"{directory / 'logs'}; run the same command again to resume them"
        )


def _expand(directories: tuple[str, ...]) -> list[Path]:
    """Run directories as given; a sweep directory (sweep.json, no config.toml) stands for its runs."""
    from opsd_core.rundir import RunDirectory
    from opsd_core.sweep import MANIFEST

    expanded = []
    for given in map(Path, directories):
        if (given / MANIFEST).is_file() and not RunDirectory(given).holds_run():
            manifest = json.loads((given / MANIFEST).read_text(encoding="utf-8"))
            expanded += [given / run["name"] for run in manifest["runs"] if RunDirectory(given / run["name"]).holds_run()]
        else:
            expanded.append(given)
    return expanded


@click.command("compare")
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="comparison", show_default=True,
              help="Where sweep.md, sweep.json and the plots go.")
def compare_command(run_dirs: tuple[str, ...], out_dir: str) -> None:
    """Compare finished runs: the report of `opsd sweep`, built from RUN_DIRs.

    Runs are grouped into grid points by the config fields whose values differ between them
    (run name, output directory, seed and launch settings apart); the seeds of a point give
    the mean and standard error. A sweep directory stands for all its runs.
    """
    from opsd_core.diagnostics.comparison import read_runs, summarise, write_comparison
    from opsd_core.rundir import RunDirectory, write_atomic
    from opsd_core.sweep import MANIFEST

    target = Path(out_dir)
    if RunDirectory(target).holds_run():
        raise ConfigError(f"--out {target}: it is a run directory (it holds config.toml); choose another --out")
    if (target / MANIFEST).is_file() and "grid" in json.loads((target / MANIFEST).read_text(encoding="utf-8")):
        raise ConfigError(f"--out {target}: it is a sweep directory (its {MANIFEST} is the sweep's); choose another --out")
    directories = _expand(run_dirs)
    runs, keys = read_runs(directories)
    report = summarise(runs, keys)
    path = write_comparison(target, report)
    manifest = {"runs": [str(directory) for directory in directories], "report": report}
    write_atomic(target / MANIFEST, json.dumps(manifest, indent=2))
    click.echo(f"{len(runs)} runs in {len(report['points'])} grid points; grid keys: {', '.join(keys) or 'none'}")
    click.echo(f"Report: {path}")


def add_sweep_commands(cli: click.Group) -> None:
    for command in (sweep_command, compare_command):
        cli.add_command(command)
