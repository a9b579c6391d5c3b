"""`profit-ds sweep`: a grid of runs (federated settings x grid values x seeds) and its summary.

A sweep file names what varies; every cell is one ordinary `profit-ds run` into its own
directory, `OUTPUT_DIR/<group>/seed-<n>`, where `<group>` is a readable slug of the setting's
name and the grid values (stable across invocations: it depends on the spec only). Three parts:

1. **Spec and plan** (pure): `parse_spec` checks the file field by field, `plan_cells` expands
   it, `cell_config` turns a cell into a validated `RunConfig` through config.py's own checks.
   Everything is checked for every cell before the first one runs.
2. **Execution**: `run_sweep` runs the cells one after another through `runner.run`, skipping a
   finished cell of the same config, resuming an unfinished one, and loading the backbone once
   for consecutive cells that share it. Restarting an interrupted sweep is running it again.
3. **Summary** (pure): `summarize` reduces each cell's `results.json` to mean and sample
   standard deviation over seeds per group; `summary_table` / `summary_csv` render it.

SPMD: every rank runs `run_sweep` with the same plan and takes the same decisions (they are
made before anything is written, then the ranks meet at a barrier); rank 0 alone prints and
writes, as in `runner.run`.
"""
from __future__ import annotations

import csv
import io as _stdio
import itertools
import json
import re
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from profit_ds.config import FIELD_TYPES, RunConfig, build, coerce, read_config_file
from profit_ds.errors import UsageError

TOP_LEVEL = ("output_dir", "base", "settings", "grid", "seeds")
# RunConfig fields a sweep sets itself, and where the user says them instead
RESERVED = {"seed": "list the seeds under the top-level 'seeds'",
            "output_dir": "set the top-level 'output_dir' (or pass --output-dir)",
            "overwrite": "pass --overwrite to `profit-ds sweep`",
            "resume": "a sweep resumes unfinished cells by itself",
            "num_procs": "pass --num-procs to `profit-ds sweep`"}
SUMMARY_FILES = ("summary.json", "summary.csv")


# --------------------------------------------------------------------------- spec
@dataclass
class SweepSpec:
    """A checked sweep file; keys normalized (`num-clients` -> `num_clients`), ints given for
    float options made floats, so equal specs compare equal however they were written."""

    path: str
    output_dir: str | None
    base: dict[str, Any]
    settings: list[dict[str, Any]]  # each has "name" and RunConfig fields
    grid: dict[str, list]
    seeds: list[int]

    def canonical(self) -> dict:
        """What OUTPUT_DIR/sweep.yaml holds: everything that decides the cells' configs."""
        return {"base": self.base, "settings": self.settings, "grid": self.grid,
                "seeds": self.seeds}


def _options(path: str, where: str, data: Any, *, allow_name: bool = False) -> dict[str, Any]:
    """A mapping of RunConfig options: known, not reserved, each of the right type."""
    if not isinstance(data, dict):
        raise UsageError(f"{path}: {where}: expected a mapping of run options")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if allow_name and name == "name":
            continue
        if name in RESERVED:
            raise UsageError(f"{path}: {where}.{name}: set by the sweep ({RESERVED[name]})")
        if name not in FIELD_TYPES:
            raise UsageError(f"{path}: {where}.{key}: unknown option (the options of "
                             "`profit-ds run --config`)")
        out[name] = coerce(name, value, f"{path}: {where}.{name}")
    return out


def _non_empty_list(path: str, where: str, value: Any) -> list:
    if not isinstance(value, list) or not value:
        raise UsageError(f"{path}: {where}: expected a non-empty list, got {value!r}")
    return value


def parse_spec(data: Any, path: str) -> SweepSpec:
    """Check a loaded sweep file; errors are one line naming the file and the field."""
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping with keys {', '.join(TOP_LEVEL)}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    for key in data:
        if key not in TOP_LEVEL:
            raise UsageError(f"{path}: {key}: unknown key (expected {', '.join(TOP_LEVEL)})")
    output_dir = data.get("output_dir")
    if output_dir is not None and (not isinstance(output_dir, str) or not output_dir):
        raise UsageError(f"{path}: output_dir: expected a path, got {output_dir!r}")
    base = _options(path, "base", {} if data.get("base") is None else data["base"])

    settings = []
    if "settings" in data:
        names: set[str] = set()
        for i, raw in enumerate(_non_empty_list(path, "settings", data["settings"])):
            where = f"settings[{i}]"
            opts = _options(path, where, raw, allow_name=True)
            name = raw.get("name")
            if not isinstance(name, str) or not name.strip():
                raise UsageError(f"{path}: {where}.name: give each setting a name (a string)")
            if name in names:
                raise UsageError(f"{path}: {where}.name: {name!r} is used twice")
            names.add(name)
            for key in opts:
                if key in base:
                    raise UsageError(f"{path}: {where}.{key}: also set in base (a key is "
                                     "either shared by every cell or set per setting)")
            settings.append({"name": name, **opts})

    grid: dict[str, list] = {}
    raw_grid = {} if data.get("grid") is None else data["grid"]
    if not isinstance(raw_grid, dict):
        raise UsageError(f"{path}: grid: expected a mapping of option names to lists")
    for key, values in raw_grid.items():
        name = str(key).replace("-", "_")
        where = f"grid.{name}"
        if name in RESERVED:
            raise UsageError(f"{path}: {where}: set by the sweep ({RESERVED[name]})")
        if name not in FIELD_TYPES:
            raise UsageError(f"{path}: grid.{key}: unknown option (the options of "
                             "`profit-ds run --config`)")
        if name in base:
            raise UsageError(f"{path}: {where}: also set in base (a key is either shared by "
                             "every cell or varied by the grid)")
        for s in settings:
            if name in s:
                raise UsageError(f"{path}: {where}: also set in setting {s['name']!r} (a key "
                                 "is either set per setting or varied by the grid)")
        vals = [coerce(name, v, f"{path}: {where}[{i}]")
                for i, v in enumerate(_non_empty_list(path, where, values))]
        for i, v in enumerate(vals):
            if v in vals[:i]:
                raise UsageError(f"{path}: {where}[{i}]: {v!r} appears twice")
        grid[name] = vals

    if "seeds" not in data:
        raise UsageError(f"{path}: seeds: missing (a list of seeds, e.g. [0, 1, 2])")
    seeds = _non_empty_list(path, "seeds", data["seeds"])
    for i, s in enumerate(seeds):
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise UsageError(f"{path}: seeds[{i}]: expected an integer >= 0, got {s!r}")
        if s in seeds[:i]:
            raise UsageError(f"{path}: seeds[{i}]: {s} appears twice")
    return SweepSpec(path, output_dir, base, settings, grid, list(seeds))


def load_spec(path: str) -> SweepSpec:
    return parse_spec(read_config_file(path), path)


# --------------------------------------------------------------------------- plan
def fmt(value: Any) -> str:
    """A grid value as labels show it: `0.1`, `iid`, `dirichlet:0.5`, `1.0,30.0`."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return ",".join(fmt(v) for v in value)
    return "none" if value is None else str(value)


def slug(text: str) -> str:
    """Filesystem-safe: letters, digits and `.=+-_` kept, every other run of characters `-`."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text.replace(",", "+")).strip("-.")


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: a setting, one value per grid key, and a seed."""

    index: int  # 1-based, in plan order
    setting: str | None
    grid: tuple[tuple[str, Any], ...]
    seed: int
    group: str  # directory of the group (setting + grid values), seeds below it
    values: dict = field(hash=False, compare=False)  # RunConfig fields without seed/output_dir

    @property
    def label(self) -> str:
        """`fedavg-adam heterogeneity=iid`: the group as the progress lines and table show it."""
        return " ".join(_parts(self.setting, self.grid)) or "base"

    def directory(self, output_dir: str | Path) -> Path:
        return Path(output_dir) / self.group / f"seed-{self.seed}"


def _parts(setting: str | None, grid: tuple[tuple[str, Any], ...]) -> list[str]:
    return ([setting] if setting else []) + [f"{k}={fmt(v)}" for k, v in grid]


def plan_cells(spec: SweepSpec) -> list[Cell]:
    """settings x product(grid) x seeds, in that order (seeds innermost)."""
    settings = spec.settings or [{"name": None}]
    keys = list(spec.grid)
    cells: list[Cell] = []
    groups: dict[str, str] = {}
    for setting in settings:
        opts = {k: v for k, v in setting.items() if k != "name"}
        for combo in itertools.product(*(spec.grid[k] for k in keys)):
            grid = tuple(zip(keys, combo))
            label = " ".join(_parts(setting["name"], grid)) or "base"
            parts = [slug(p) for p in _parts(setting["name"], grid)]
            if not all(parts):
                raise UsageError(f"{spec.path}: settings: name {setting['name']!r} has no "
                                 "letter or digit to name a directory after")
            group = "__".join(parts) or "base"
            if group in groups:
                raise UsageError(f"{spec.path}: settings/grid: {label!r} and {groups[group]!r} "
                                 f"map to the same directory {group!r}; rename a setting")
            groups[group] = label
            for seed in spec.seeds:
                cells.append(Cell(len(cells) + 1, setting["name"], grid, seed, group,
                                  {**spec.base, **opts, **dict(grid)}))
    return cells


def cell_config(cell: Cell, output_dir: str | Path, num_procs: int, n_cells: int,
                path: str) -> RunConfig:
    """The cell's RunConfig, checked by config.validate like `profit-ds run`'s; an error names
    the sweep file and the cell."""
    values = {**cell.values, "seed": cell.seed, "output_dir": str(cell.directory(output_dir)),
              "num_procs": num_procs}
    try:
        cfg = build(values)
    except UsageError as err:
        raise UsageError(f"{path}: cell {cell.index}/{n_cells} ({cell.label}, seed "
                         f"{cell.seed}): {err}") from None
    return cfg


def check_before_running(cells: Sequence[Cell], cfgs: Sequence[RunConfig], path: str,
                         n_cells: int, offline: bool = False) -> None:
    """What `runner.run` would reject only after loading things, checked for every cell now: the
    model name, the DeepSpeed config, the settings against the model's config and tokenizer
    (fetched once per model, without the weights), and the partition (built once per distinct
    data spec; it is cheap next to training). Uses runner.run's own steps.

    `offline` (a dry run): nothing is downloaded; a hub model that is not in the local cache
    skips the model checks, which the sweep itself then makes before its first cell.
    """
    from profit_ds.model.aliases import resolve_model
    from profit_ds.model.ds_config import load_ds_config
    from profit_ds.data.for_run import load_tasks, partition_spec, run_partition
    from profit_ds.runner import check_fits

    tasks: dict[tuple, list] = {}
    models: dict[tuple, tuple] = {}
    seen: set = set()
    for cell, cfg in zip(cells, cfgs):
        try:
            resolve_model(cfg.model)  # an unknown alias or missing folder, even offline
            model_key = (cfg.model, cfg.trust_remote_code)
            if model_key not in models:
                models[model_key] = _model_files(*model_key, offline)
            if models[model_key]:
                check_fits(cfg, *models[model_key])
            load_ds_config(cfg.ds_config, dtype=cfg.dtype, micro_batch=1)
            data_key = (cfg.data, cfg.language, cfg.instances_per_task)
            key = (data_key, partition_spec(cfg), cfg.positive_examples, cfg.clients_per_round)
            if key in seen:
                continue
            seen.add(key)
            if data_key not in tasks:
                tasks[data_key] = load_tasks(cfg)
            run_partition(cfg, tasks[data_key])
        except UsageError as err:
            raise UsageError(f"{path}: cell {cell.index}/{n_cells} ({cell.label}, seed "
                             f"{cell.seed}): {err}") from None


def _model_files(model: str, trust_remote_code: bool, offline: bool) -> tuple | None:
    """The model's config and tokenizer; None where `offline` would need a download."""
    from profit_ds.model.backbone import load_config_and_tokenizer

    try:
        return load_config_and_tokenizer(model, trust_remote_code, local_files_only=offline)
    except UsageError:
        if offline:
            return None
        raise


# --------------------------------------------------------------------------- execution
def cell_status(directory: Path, cfg: RunConfig) -> str:
    """new | finished | unfinished (resumable) | conflict (a run of another config)."""
    from profit_ds.checkpoint import config_hash
    from profit_ds.runner import CHECKPOINTS

    want = config_hash(cfg.to_dict())
    started = any((directory / CHECKPOINTS).glob("ckpt-*.safetensors"))
    for name, status in (("results.json", "finished"), ("config.json", "unfinished")):
        p = directory / name
        if p.exists():
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
                got = config_hash(data["config"] if name == "results.json" else data)
            except (ValueError, KeyError, TypeError):
                return "conflict"
            if got != want:
                return "conflict"
            # killed before its first checkpoint: nothing to resume, start it anew
            return "new" if status == "unfinished" and not started else status
    return "conflict" if (directory / CHECKPOINTS).exists() else "new"


def check_output_dir(out: Path, spec: SweepSpec, overwrite: bool) -> None:
    """Refuse a directory that holds another sweep (its sweep.yaml differs)."""
    import yaml

    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: exists and is not a directory")
    saved = out / "sweep.yaml"
    if not saved.exists() or overwrite:
        return
    try:
        same = yaml.safe_load(saved.read_text(encoding="utf-8")) == spec.canonical()
    except Exception:  # unreadable: certainly not this sweep
        same = False
    if not same:
        raise UsageError(f"--output-dir {out}: holds a different sweep (compare {saved} with "
                         f"{spec.path}); use another --output-dir, or --overwrite to continue "
                         "there with the new spec")


@dataclass
class SweepPlan:
    """Every cell, its checked config and its state on disk, decided before anything runs."""

    spec: SweepSpec
    output_dir: Path
    cells: list[Cell]
    configs: list[RunConfig]
    status: list[str]  # cell_status of each cell

    def lines(self) -> list[str]:
        n = len(self.cells)
        return [f"cell {c.index}/{n} {c.label} seed {c.seed}: {st} -> "
                f"{c.directory(self.output_dir)}" for c, st in zip(self.cells, self.status)]


def prepare_sweep(spec: SweepSpec, output_dir: str | Path, *, num_procs: int = 1,
                  overwrite: bool = False, dry_run: bool = False) -> SweepPlan:
    """Plan and check everything, reading the output directory but writing nothing: a bad
    value in the last cell fails now, not after the others ran. A dry run downloads nothing
    and lists cells holding a run of another config instead of refusing them."""
    out = Path(output_dir)
    cells = plan_cells(spec)
    cfgs = [cell_config(c, out, num_procs, len(cells), spec.path) for c in cells]
    check_output_dir(out, spec, overwrite)
    status = [cell_status(c.directory(out), cfg) for c, cfg in zip(cells, cfgs)]
    pending = [i for i, st in enumerate(status) if st != "finished"]
    check_before_running([cells[i] for i in pending], [cfgs[i] for i in pending], spec.path,
                         len(cells), offline=dry_run)
    for cell, st in zip(cells, status):
        if st == "conflict" and not dry_run and not overwrite:
            raise UsageError(f"{cell.directory(out)}: holds a run of another config than cell "
                             f"{cell.index} ({cell.label}, seed {cell.seed}); pass --overwrite "
                             "to replace it, or use another --output-dir")
    return SweepPlan(spec, out, cells, cfgs, status)


def run_sweep(plan: SweepPlan, say: Callable[[str], None] = print) -> dict:
    """Run every cell not finished yet, in order; write and return the summary.

    `say` prints a progress line (rank 0's Reporter console in the CLI). Every rank calls this
    with the same plan (the process group already set up). The sweep holds its output
    directory (`run_lock`): a second sweep there is refused, as is a second run in a cell.
    """
    from profit_ds.run_lock import held_by_this_run

    with held_by_this_run(plan.output_dir):
        return _run_cells(plan, say)


def _run_cells(plan: SweepPlan, say: Callable[[str], None]) -> dict:
    import yaml

    from profit_ds import distributed, io, runner
    from profit_ds.model.backbone import load_backbone

    out, cells, n = plan.output_dir, plan.cells, len(plan.cells)
    distributed.barrier()  # every rank has read the directory before rank 0 changes it
    if distributed.is_main():
        saved = out / "sweep.yaml"
        text = yaml.safe_dump(plan.spec.canonical(), sort_keys=False)
        if not saved.exists() or saved.read_text(encoding="utf-8") != text:
            io.write_text(saved, text)
        for cell, st in zip(cells, plan.status):
            if st == "conflict":
                shutil.rmtree(cell.directory(out))
    distributed.barrier()

    backbone, loaded = None, None
    for cell, cfg, st in zip(cells, plan.configs, plan.status):
        head = f"cell {cell.index}/{n} {cell.label} seed {cell.seed}"
        if st == "finished":
            say(f"{head}: skipped (finished)")
            continue
        key = (cfg.model, cfg.dtype, cfg.ds_config, cfg.trust_remote_code)
        if key != loaded:  # consecutive cells of one backbone share one load
            backbone = None  # free the previous one first
            say(f"loading backbone {cfg.model} ({cfg.dtype})")
            backbone, loaded = load_backbone(*key), key
        cfg.resume = st == "unfinished"
        say(f"{head}: running" + {"unfinished": " (resuming)",
                                  "conflict": " (replacing a run of another config)"}.get(st, ""))
        t = time.perf_counter()
        results = runner.run(cfg, backbone=backbone)
        stopped = "" if results.get("global") is not None else (
            f" ({results['diverged'][0]['message']}; the sweep goes on)")
        say(f"{head}: done in {time.perf_counter() - t:.0f}s{stopped}")

    distributed.barrier()  # rank 0 has written the last results.json
    summary = summarize(cells, [read_results(c.directory(out)) for c in cells])
    if distributed.is_main():
        io.write_json(out / "summary.json", summary)
        io.write_text(out / "summary.csv", summary_csv(summary))
    return summary


def read_results(directory: Path) -> dict:
    return json.loads((directory / "results.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- summary
def stat(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (n - 1; None for one value) of per-seed values."""
    values = list(values)
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None, "values": values}


def _last_epoch_scores(results: dict) -> dict[float, dict]:
    """lr -> the `personalized` row of its last epoch."""
    last: dict[float, dict] = {}
    for row in results["personalized"]:
        if row["lr"] not in last or row["epoch"] > last[row["lr"]]["epoch"]:
            last[row["lr"]] = row
    return last


def summarize(cells: Sequence[Cell], results: Sequence[dict]) -> dict:
    """Per group (setting + grid values), over its seeds: the initial and the federated
    prompt's local and global ROUGE-L, and for each personalization lr at its last epoch the
    local and global ROUGE-L; each as mean, sample std and per-seed values."""
    groups: dict[str, list[tuple[Cell, dict]]] = {}
    for cell, res in zip(cells, results):
        groups.setdefault(cell.group, []).append((cell, res))
    rows = []
    for group, members in groups.items():
        first = members[0][0]
        diverged = [c.seed for c, r in members if r.get("global") is None]
        members = [(c, r) for c, r in members if r.get("global") is not None]
        if not members:  # every seed's training diverged: nothing to average
            rows.append({"group": group, "label": first.label, "setting": first.setting,
                         "grid": {k: v for k, v in first.grid}, "seeds": [], "n": 0,
                         "diverged_seeds": diverged})
            continue
        rs = [r for _, r in members]
        lasts = [_last_epoch_scores(r) for r in rs]
        personalized = []
        for lr in lasts[0]:
            rows_lr = [last[lr] for last in lasts if lr in last]
            personalized.append({
                "lr": lr, "epoch": rows_lr[0]["epoch"],
                "local_rouge_l": stat([r["local_rouge_l"] for r in rows_lr]),
                "global_rouge_l": stat([r["global_rouge_l"] for r in rows_lr])})
        rows.append({
            "group": group, "label": first.label, "setting": first.setting,
            "grid": {k: v for k, v in first.grid}, "seeds": [c.seed for c, _ in members],
            "n": len(members), "diverged_seeds": diverged,
            **({"backbone_local_rouge_l": stat([r["backbone"]["local_rouge_l"] for r in rs]),
                "backbone_global_rouge_l": stat([r["backbone"]["global_rouge_l"] for r in rs])}
               if all(r.get("backbone") for r in rs) else {}),
            "initial_local_rouge_l": stat([r["initial"]["local_rouge_l"] for r in rs]),
            "initial_global_rouge_l": stat([r["initial"]["global_rouge_l"] for r in rs]),
            "federated_local_rouge_l": stat([r["global"]["local_rouge_l"] for r in rs]),
            "federated_global_rouge_l": stat([r["global"]["global_rouge_l"] for r in rs]),
            "personalized": personalized})
    return {"metric": "ROUGE-L (SNI's, 0-100) over test clients; mean and sample std "
                      "(n - 1) over seeds", "groups": rows}


METRICS = ("backbone_local_rouge_l", "backbone_global_rouge_l", "initial_local_rouge_l",
           "initial_global_rouge_l", "federated_local_rouge_l", "federated_global_rouge_l")


def mean_std(s: dict) -> str:
    """`12.34 ± 0.56`; `12.34 ± -` for one seed."""
    return f"{s['mean']:.2f} ± " + ("-" if s["std"] is None else f"{s['std']:.2f}")


def summary_table(summary: dict):
    """One section per group: the initial and federated prompts, then each personalization
    lr after its last epoch; local and global ROUGE-L as mean ± std over the seeds."""
    from rich.table import Table

    table = Table(title="Sweep: ROUGE-L over test clients, mean ± std over seeds",
                  caption="lr=X: the federated prompt personalized with learning rate X, "
                          "after its last epoch")
    for col, justify in (("cell", "left"), ("seeds", "right"), ("prompt", "left"),
                         ("local ROUGE-L", "right"), ("global ROUGE-L", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for row in summary["groups"]:
        if not row["n"]:
            table.add_row(row["label"], "0", "diverged (seeds "
                          f"{', '.join(map(str, row['diverged_seeds']))})", "", "",
                          end_section=True)
            continue
        lines = [(name, row[f"{name}_local_rouge_l"], row[f"{name}_global_rouge_l"])
                 for name in ("backbone", "initial", "federated")
                 if f"{name}_local_rouge_l" in row]
        lines += [(f"lr={p['lr']:g}, epoch {p['epoch']}", p["local_rouge_l"],
                   p["global_rouge_l"]) for p in row["personalized"]]
        for i, (name, local, glob) in enumerate(lines):
            table.add_row(row["label"] if i == 0 else "", str(row["n"]) if i == 0 else "",
                          name, mean_std(local), mean_std(glob),
                          end_section=i == len(lines) - 1)
    return table


def summary_csv(summary: dict) -> str:
    """Long format: one line per (group, metric[, lr]): group, setting, grid values, seeds,
    metric, lr, epoch, mean, std (std empty for one seed)."""
    keys = list(summary["groups"][0]["grid"]) if summary["groups"] else []
    buf = _stdio.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["group", "setting", *keys, "seeds", "metric", "lr", "epoch", "mean", "std"])
    for row in summary["groups"]:
        if not row["n"]:  # every seed diverged: no numbers to write
            continue
        head = [row["group"], row["setting"] or "", *(fmt(row["grid"][k]) for k in keys),
                row["n"]]
        lines = [(key, row[key], "", "") for key in METRICS if key in row]
        for p in row["personalized"]:
            lines += [(f"personalized_{m}", p[m], p["lr"], p["epoch"])
                      for m in ("local_rouge_l", "global_rouge_l")]
        for metric, s, lr, epoch in lines:
            w.writerow([*head, metric, lr, epoch, repr(s["mean"]),
                        "" if s["std"] is None else repr(s["std"])])
    return buf.getvalue()
