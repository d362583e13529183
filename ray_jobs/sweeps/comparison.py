"""Method comparison: named methods x seeds as Ray Tune trials, each best checkpoint evaluated on
test, one table of mean ± std over seeds and a paired comparison against a baseline.

    python -m ray_jobs.compare --config configs/compare-retina.yaml --data runs/data/retina
    python -m ray_jobs.compare --config configs/compare-retina.yaml --seeds 0 1 2 3 4 --epochs 30 \
        --storage s3://b/compare --name retina-5seeds
    python -m ray_jobs.compare --config configs/compare-retina.yaml --resume   # after an interruption

A method is a ``TrainConfig`` overlay on ``base`` (``CompareConfig``, ``ray_jobs.sweeps.config``): model,
loss, loss parameters, and anything else, including ``data`` (its own dataset, e.g. one with GAN
images added). The grid (method x seed) runs through the sweep's trial code
(``ray_jobs.sweeps.tuning``: Tune trials that fit ``ray_jobs.train``'s loop, as many at once as the cluster
fits). Each trial's best checkpoint (by ``base.checkpoint_metric`` on val) is then scored on
``split`` with ``ray_jobs.classifier.evaluation.evaluate``.

Results in ``<storage>/<name>/``: ``compare.yaml`` (resolved config), ``runs.csv`` (one row per
method and seed with the test metrics), ``comparison.csv`` and ``comparison.md`` (per method:
mean ± std of macro-F1, B-ACC, ECE, Brier, AUC; each method minus the baseline with a 95%
t-interval over paired seeds: ``metrics.comparison``), and ``eval/<method>-seed<k>/`` reports.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from medbalance.errors import ConfigError
from ray_jobs.runtime import configs as config_lib
from ray_jobs.runtime.progress import say
from ray_jobs.runtime.run_dir import RunDir
from ray_jobs.sweeps import tuning
from ray_jobs.sweeps.config import CompareConfig
from shards import storage

COMPARE_FILE, RUNS_FILE, TABLE_CSV, TABLE_MD = "compare.yaml", "runs.csv", "comparison.csv", "comparison.md"
FIXED = ("name", "storage", "seed", "num_workers", "use_gpu", "cpus_per_worker")   # per-grid, not per-method


def _overlay(name: str, overlay) -> dict:
    """A method's overlay with ``data: URI`` expanded and local paths made absolute."""
    if not isinstance(overlay, dict):
        raise ConfigError(f"methods.{name} must be a mapping of TrainConfig keys, got {overlay!r}")
    fixed = sorted(set(overlay) & set(FIXED))
    if fixed:
        raise ConfigError(f"methods.{name}: {fixed} are set for the whole grid (base, seeds), not per method")
    overlay = dict(overlay)
    if isinstance(overlay.get("data"), str):
        overlay["data"] = {"uri": overlay["data"]}
    if isinstance(overlay.get("data"), dict) and overlay["data"].get("uri"):
        overlay["data"] = {**overlay["data"], "uri": tuning.absolute(overlay["data"]["uri"])}
    if overlay.get("pretrained"):
        overlay["pretrained"] = tuning.absolute(overlay["pretrained"])
    return overlay


def check_compare(cfg: CompareConfig) -> dict:
    """Check the grid before any trial; returns ``{method: overlay}`` ready for the trials."""
    from shards import read_manifest

    from ray_jobs.sweeps.search import absolute_paths, check_seed
    from ray_jobs.sweeps.search_space import check_params

    if not isinstance(cfg.methods, dict) or not cfg.methods:
        raise ConfigError("the comparison has no methods: give `methods:` {name: {model: ..., loss: ...}}")
    seeds = cfg.seeds
    if not isinstance(seeds, list) or not seeds or len(set(map(repr, seeds))) != len(seeds):
        raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {seeds!r}")
    for seed in seeds:
        check_seed(seed, "seeds")
    check_folder_names(list(cfg.methods))
    cfg.baseline = cfg.baseline or next(iter(cfg.methods))
    if cfg.baseline not in cfg.methods:
        raise ConfigError(f"baseline {cfg.baseline!r} is not one of the methods {list(cfg.methods)}")
    absolute_paths(cfg.base)
    cfg.eval_data = tuning.absolute(cfg.eval_data)
    base = config_lib.to_dict(cfg.base)
    overlays = {}
    for name, overlay in cfg.methods.items():
        overlays[name] = _overlay(str(name), overlay)
        tree = config_lib.to_dict(config_lib.load_config(type(cfg.base), base=base))
        config_lib.merge(tree, overlays[name])
        trial = config_lib.load_config(type(cfg.base), base=tree)
        if not trial.data.uri:
            raise ConfigError(f"methods.{name}: no dataset; pass --data or give the method `data: URI`")
        check_params(tree, {}, f"methods.{name}", read_manifest(trial.data.uri).class_counts("train"))
    return overlays


def check_folder_names(methods: list) -> None:
    """Refuse two methods whose runs would share a folder (``tuning.run_name`` maps every character
    outside ``A-Za-z0-9_.-`` to ``_``: "r18 ce" and "r18_ce" both train in ``r18_ce-seed0``)."""
    seen: dict[str, str] = {}
    for method in methods:
        folder = tuning.run_name({"method": method, "seed": 0}, "")
        if folder in seen:
            raise ConfigError(f"methods {seen[folder]!r} and {method!r} would train in the same folder "
                              f"trials/{folder}: rename one (names differ only in characters outside "
                              "A-Za-z0-9_.-, which folder names replace with _)")
        seen[folder] = method


def check_trial_configs(cfg: CompareConfig, folder: RunDir, overlays: dict, rows: list[dict]) -> None:
    """Each trial's saved ``trials/<run>/config.yaml`` holds its method's overlay and its seed; a
    mismatch (a folder another method or an earlier comparison wrote) stops before the table."""
    import yaml

    from ray_jobs.sweeps import report

    trials = storage.join(folder.uri, tuning.TRIALS_DIR)
    base = config_lib.to_dict(cfg.base)
    for row in rows:
        if row["status"] == report.FAILED:
            continue
        params = {"method": row["method"], "seed": row["seed"]}
        run = RunDir(trials, tuning.run_name(params, row["trial_id"]))
        fs, path = storage.resolve(run.uri)
        if not storage.exists(fs, f"{path}/config.yaml", run.uri):
            continue
        saved = yaml.safe_load(storage.read_bytes(fs, f"{path}/config.yaml", run.uri)) or {}
        built = config_lib.to_dict(tuning.trial_config(params, base, overlays, trials, row["trial_id"]))
        wrong = _differences(_pick(built, {**overlays[row["method"]], "seed": None}), saved)
        if wrong:
            raise ConfigError(f"{run.uri}/config.yaml does not hold method {row['method']!r} seed {row['seed']} "
                              f"({', '.join(wrong)}): its run was trained with another config; nothing was "
                              "written. Rerun the comparison under a new --name")


def _pick(tree: dict, keys: dict) -> dict:
    """The part of ``tree`` at the (nested) keys of ``keys``."""
    return {k: _pick(tree[k], v) if isinstance(v, dict) and isinstance(tree.get(k), dict) else tree.get(k)
            for k, v in keys.items()}


def _differences(expected: dict, saved: dict, prefix: str = "") -> list[str]:
    """Dotted keys where ``saved`` differs from ``expected`` (only the keys ``expected`` sets)."""
    wrong = []
    for key, value in expected.items():
        if isinstance(value, dict) and isinstance(saved.get(key), dict):
            wrong += _differences(value, saved[key], f"{prefix}{key}.")
        elif saved.get(key) != value:
            wrong.append(f"{prefix}{key}: {saved.get(key)!r} instead of {value!r}")
    return wrong


def compare(cfg: CompareConfig, resume: bool = False) -> dict:
    """Run (or continue) the grid, evaluate every best checkpoint, write the tables.

    Returns:
        ``{"uri", "runs", "rows", "markdown", "seconds"}``.
    """
    from ray import tune

    from ray_jobs.runtime.resources import plan_trials
    from ray_jobs.runtime.ray_setup import init_ray
    from ray_jobs.sweeps.search import QUIET_LINES

    cfg.storage = tuning.absolute(cfg.storage)
    storage.check_folder(cfg.storage, "--storage")
    folder = RunDir(cfg.storage, cfg.name)
    cfg = tuning.resolve_resume(folder, cfg, resume, COMPARE_FILE)
    overlays = check_compare(cfg)

    from ray_jobs.runtime.ray_setup import add_quiet_worker_lines

    add_quiet_worker_lines(*QUIET_LINES)
    init_ray()
    base = cfg.base
    trials = len(cfg.methods) * len(cfg.seeds)
    concurrent, cpus = plan_trials(base.num_workers, base.use_gpu, trials, cfg.max_concurrent_trials,
                                   base.cpus_per_worker)
    if not resume:  # only now: a grid the cluster cannot run leaves no saved config behind
        folder.write_bytes(COMPARE_FILE, config_lib.dump_yaml(cfg).encode())
    trial_base = config_lib.to_dict(base)
    trial_base["cpus_per_worker"] = cpus
    restore = resume and tuning.has_experiment(folder.uri)
    say(f"compare {folder.uri}: {len(cfg.methods)} methods x {len(cfg.seeds)} seeds, {base.epochs} epochs each, "
        f"{concurrent} at a time on {base.num_workers} worker(s) x {cpus:g} CPUs; baseline {cfg.baseline}"
        + ("; resuming" if restore else ""))
    started = time.perf_counter()
    metric, keys = base.checkpoint_metric, ["method", "seed"]
    lines = tuning.trial_lines(metric, base.checkpoint_mode, keys)
    results = tuning.fit_or_leave_nothing(folder, not resume, lines, [COMPARE_FILE], lambda: tuning.run_tuner(
        sweep_uri=folder.uri, base=trial_base, methods=overlays,
        param_space={"method": tune.grid_search(list(cfg.methods)), "seed": tune.grid_search(list(cfg.seeds))},
        search_alg=None, scheduler=None, num_samples=1, concurrent=concurrent, resume=restore,
        status_interval=cfg.status_interval, metric=metric, mode=base.checkpoint_mode, keys=keys,
        callbacks=[lines]))
    return write_tables(cfg, folder, overlays, results, time.perf_counter() - started, concurrent)


def write_tables(cfg: CompareConfig, folder: RunDir, overlays: dict, results, seconds: float,
                 concurrent: int = 1) -> dict:
    """Evaluate each trial's best checkpoint (reports already there are reused) and write the tables."""
    from metrics.comparison import COMPARE_METRICS, summarize, to_markdown
    from ray_jobs.classifier.evaluation import evaluate
    from ray_jobs.sweeps import report

    base = cfg.base
    rows, _ = report.trial_rows(results, sweep_uri=folder.uri, metric=base.checkpoint_metric,
                                mode=base.checkpoint_mode, keys=["method", "seed"])
    check_trial_configs(cfg, folder, overlays, rows)
    runs, jobs = [], {}
    for row in sorted(rows, key=lambda r: (list(cfg.methods).index(r["method"]), r["seed"])):
        run = {"method": row["method"], "seed": row["seed"], "status": row["status"],
               f"val_{base.checkpoint_metric.removeprefix('val_')}": row[f"best_{base.checkpoint_metric}"],
               "best_epoch": row["best_epoch"], "checkpoint": row["checkpoint"], "message": row["message"]}
        if row["status"] != report.FAILED and row["checkpoint"]:
            data = cfg.eval_data or (overlays[row["method"]].get("data", {}).get("uri") or base.data.uri)
            out = storage.join(folder.uri, "eval", tuning.run_name(row, row["trial_id"]))
            run["report"] = storage.join(out, "report.json")
            jobs[len(runs)] = (row["checkpoint"], data, out)
        runs.append(run)
    # Each evaluation waits mostly on its model actor starting: run them side by side, as many as
    # leave every one a CPU for its actor and one for decoding (more would starve Ray Data).
    import ray

    side_by_side = max(1, min(concurrent, int(ray.cluster_resources().get("CPU", 0) // 2)))
    with ThreadPoolExecutor(max_workers=side_by_side) as pool:
        futures = {i: pool.submit(lambda c, d, o: _existing_report(o) or evaluate(c, d, cfg.split, o,
                                                                                  calibrate=cfg.calibrate), *job)
                   for i, job in jobs.items()}
        for i, future in futures.items():
            scores = future.result()
            runs[i].update({k: scores.get(k) for k in COMPARE_METRICS})
            say(f"{runs[i]['method']} seed {runs[i]['seed']}: {cfg.split} macro-F1 {scores['macro_f1']:.4f}")
    columns = ["method", "seed", "status", *COMPARE_METRICS, f"val_{base.checkpoint_metric.removeprefix('val_')}",
               "best_epoch", "checkpoint", "report", "message"]
    folder.write_bytes(RUNS_FILE, report.csv_bytes(runs, columns))
    scored = [r for r in runs if r.get("macro_f1") is not None]
    summary = summarize(scored, cfg.baseline) if scored else []
    title = (f"{cfg.split} split, {len(cfg.seeds)} seeds, {base.epochs} epochs"
             + (", temperature-scaled" if cfg.calibrate else ""))
    markdown = to_markdown(summary, cfg.baseline, title=title) if summary else "no run finished\n"
    failed = [r for r in runs if r["status"] == report.FAILED]
    if failed:
        markdown += "\nFailed runs (left out): " + "; ".join(
            f"{r['method']} seed {r['seed']}: {r['message']}" for r in failed) + "\n"
    summary_columns = list(summary[0]) if summary else ["method"]
    for row in summary[1:]:
        summary_columns += [k for k in row if k not in summary_columns]
    folder.write_bytes(TABLE_CSV, report.csv_bytes(summary, summary_columns))
    folder.write_bytes(TABLE_MD, markdown.encode())
    print(markdown)
    say(f"{len(runs)} runs in {seconds:.0f} s ({len(failed)} failed)")
    return {"uri": folder.uri, "runs": runs, "rows": summary, "markdown": markdown, "seconds": round(seconds, 1)}


def _existing_report(out: str) -> dict | None:
    """The report a resumed comparison already wrote for this run, if any."""
    folder = RunDir(*out.rsplit("/", 1))
    fs, path = storage.resolve(folder.uri)
    return folder.read_json("report.json") if storage.exists(fs, f"{path}/report.json", folder.uri) else None
