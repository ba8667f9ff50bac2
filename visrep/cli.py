"""`visrep ...`: a thin layer over the Python API (visrep/api.py).

    visrep pretrain --config configs/simclr_cifar10.yaml train.epochs=1 optim.lr=0.5
    visrep pretrain --config ... --resume
    visrep pretrain --resume runs/simclr            # the config comes from the run itself
    visrep eval knn --model runs/simclr --dataset cifar10 --data-dir ~/data
    visrep eval linear --model timm:resnet18 --dataset digits
    visrep finetune --config configs/finetune_utkface_gender.yaml finetune.init=runs/sup finetune.mode=lora
    visrep eval fewshot --model runs/simclr --dataset mtfl --dataset-options "{task: pose}" --shots 1 5
    visrep eval calibration --model runs/ft --dataset utkface --dataset-options "{task: gender}" --out cal.json
    visrep list methods|views|masks|backbones|datasets|objectives|heads|decoders
    visrep demo

Errors a user can fix print one line (`visrep: error: ...`) and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help="dataset name (visrep list datasets); default digits")
    p.add_argument("--data-dir", default=None, help="dataset root or archive (else $VISREP_DATA)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--image-size", type=int, default=None, help="resize images (default: checkpoint's size)")
    p.add_argument("--train-subset", type=int, default=None, help="seeded subset of N training images")
    p.add_argument("--test-subset", type=int, default=None, help="seeded subset of N test images")
    p.add_argument("--label-fraction", type=float, default=None,
                   help="low-label probe: a seeded class-balanced fraction of the training labels, e.g. 0.01 "
                        "(knn, linear, calibration)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--branch", default="student", choices=["student", "teacher"],
                   help="which backbone of a checkpoint to evaluate (teacher = EMA teacher)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone-options", default=None,
                   help='options for a random-init/timm --model, as YAML, e.g. "{cifar_stem: true, width: 16}"')
    p.add_argument("--dataset-options", default=None,
                   help='dataset options as YAML, e.g. "{task: age}" for utkface or "{task: landmarks}" for mtfl')
    p.add_argument("--force", action="store_true", help="load a checkpoint that fails its integrity check")


_RESUME_HELP = ("continue a run from its last checkpoint: the run in out_dir, or RUN_DIR (its config then comes "
                "from the run)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visrep", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a backbone with a method preset")
    p.add_argument("--config", default=None, help="YAML config (see configs/)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR", help=_RESUME_HELP)
    p.add_argument("--force", action="store_true",
                    help="resume from a checkpoint that fails its integrity check (it is then overwritten)")
    p.add_argument("--data-dir", default=None, help="dataset root or archive (sets data.root)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method=byol optim.lr=0.5")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    pf = sub.add_parser("finetune", help="fine-tune a pretrained backbone (full or LoRA), export it and evaluate")
    pf.add_argument("--config", default=None, help="YAML config (see configs/finetune_*.yaml)")
    pf.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR", help=_RESUME_HELP)
    pf.add_argument("--force", action="store_true",
                    help="resume from a checkpoint that fails its integrity check (it is then overwritten)")
    pf.add_argument("--data-dir", default=None, help="dataset root or archive (sets data.root)")
    pf.add_argument("overrides", nargs="*", help="dotted overrides, e.g. finetune.init=runs/mae finetune.mode=lora")
    pf.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    pe = sub.add_parser("eval", help="evaluate a checkpoint or timm model")
    esub = pe.add_subparsers(dest="protocol", required=True)
    k = esub.add_parser("knn", help="weighted kNN on frozen features (Wu et al. 2018; k=20, T=0.07 as DINO)")
    k.add_argument("--model", required=True, help="checkpoint file, run directory, or timm:NAME")
    _add_data_args(k)
    k.add_argument("--k", type=int, default=20)
    k.add_argument("--temperature", type=float, default=0.07)
    cp = esub.add_parser("classifier", help="top-1 of a supervised run's own classifier head on the test split")
    cp.add_argument("--model", required=True, help="checkpoint file or run directory of a supervised run")
    _add_data_args(cp)
    lp = esub.add_parser("linear", help="offline linear probe on cached frozen features")
    lp.add_argument("--model", required=True, help="checkpoint file, run directory, or timm:NAME")
    _add_data_args(lp)
    lp.add_argument("--epochs", type=int, default=None)
    lp.add_argument("--lr", type=float, default=None)
    lp.add_argument("--weight-decay", type=float, default=None)
    lp.add_argument("--solver", default="sgd", choices=["sgd", "lbfgs"],
                    help="sgd: 100-epoch SGD (DINO's protocol); lbfgs: full-batch L-BFGS with L2 chosen on a "
                         "held-out slice (Kornblith et al. 2019), much faster")

    fs = esub.add_parser("fewshot", help="n-shot episodes on frozen features, mean ± 95%% CI (SimpleShot)")
    fs.add_argument("--model", required=True, help="checkpoint file, run directory, or timm:NAME")
    _add_data_args(fs)
    fs.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    fs.add_argument("--ways", type=int, default=None, help="classes per episode (default: all)")
    fs.add_argument("--queries", type=int, default=15, help="query images per class and episode")
    fs.add_argument("--episodes", type=int, default=200)
    ca = esub.add_parser("calibration", help="expected calibration error and a reliability diagram")
    ca.add_argument("--model", required=True, help="checkpoint file, run directory, or timm:NAME")
    _add_data_args(ca)
    ca.add_argument("--head", default="auto", choices=["auto", "own", "linear"],
                    help="own: the run's classifier; linear: a linear probe on frozen features")
    ca.add_argument("--bins", type=int, default=15)
    ca.add_argument("--plot", default=None, help="reliability diagram PNG (default: <out>.png)")

    fp = esub.add_parser("faceptor", help="every task of a multi-task face run on its test split, Layer-Attention "
                                          "profiles and a figure of predictions")
    fp.add_argument("--model", required=True, help="run directory or checkpoint of a faceptor / faceptor_naive run")
    fp.add_argument("--data-dir", default=None, help="the tasks' data root (default: the run's data.root)")
    fp.add_argument("--image-size", type=int, default=None, help="default: the run's own")
    fp.add_argument("--batch-size", type=int, default=64)
    fp.add_argument("--device", default="cpu")
    fp.add_argument("--test-subset", type=int, default=None, help="seeded subset of each task's test split")
    fp.add_argument("--seed", type=int, default=0)
    fp.add_argument("--out", default=None, help="JSON of the results; the figures go beside it")
    fp.add_argument("--force", action="store_true", help="load a checkpoint that fails its integrity check")

    pp = sub.add_parser("predict", help="every task's prediction of a multi-task face run for image files")
    pp.add_argument("--model", required=True, help="run directory or checkpoint of a faceptor / faceptor_naive run")
    pp.add_argument("images", nargs="+", help="image files")
    pp.add_argument("--device", default="cpu")
    pp.add_argument("--json", action="store_true", help="print JSON instead of one line per image and task")

    ps = sub.add_parser("study", help="studies: a grid of runs with a fair budget and the evaluations they get")
    ssub = ps.add_subparsers(dest="verb", required=True)
    spl = ssub.add_parser("plan", help="list and validate every run and evaluation of a study, with its cost")
    spl.add_argument("study", help="the study's YAML file (see studies/)")
    spl.add_argument("--json", default=None, help="also write the plan as JSON here")
    srn = ssub.add_parser("run", help="run every missing run and evaluation (resumable; failures are recorded)")
    srn.add_argument("study", help="the study's YAML file")
    srn.add_argument("--workers", type=int, default=1, help="local worker processes (threads split between them)")
    srn.add_argument("--executor", default="local", choices=["local", "slurm"],
                     help="local: worker processes here; slurm: one submitit job per run (at most --workers at once)")
    srn.add_argument("--executor-options", default=None,
                     help="submitit parameters as YAML, e.g. '{slurm_partition: dev, timeout_min: 240, "
                          "gpus_per_node: 1}' ({cluster: local} runs the slurm path on this machine)")
    sst = ssub.add_parser("status", help="done / failed / started / pending, per run")
    sst.add_argument("study", help="the study's YAML file")
    srp = ssub.add_parser("report", help="aggregate the results into an HTML report with figures (offline)")
    srp.add_argument("study", help="the study's YAML file")
    srp.add_argument("--out", default=None, help="report folder (default: <study out_dir>/report)")
    srp.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over seeds")
    srp.add_argument("--tensorboard", action="store_true",
                     help="also export every run's factors and metrics as TensorBoard HParams")

    pr = sub.add_parser("rank", help="rank a pool of backbones on a target with transferability scores")
    pr.add_argument("--models", nargs="+", required=True,
                    help="checkpoints, run directories, timm:NAME, a folder of runs, or a YAML list")
    _add_data_args(pr)
    pr.add_argument("--scores", default=None, help="comma-separated score names (visrep list scores); default all")
    pr.add_argument("--score-options", default=None,
                    help='keyword arguments per score as YAML, e.g. "{tmi: {normalize: true}}" for a pool of mixed '
                         'feature widths')
    pr.add_argument("--truth", nargs="?", const="linear", default="none", choices=["none", "linear", "finetune"],
                    help="also measure each model's ground truth and correlate the scores with it: linear (the "
                         "default when --truth is given alone): L-BFGS linear-probe top-1; finetune: visrep finetune "
                         "over a small lr grid chosen on a held-out part of the training split")
    pr.add_argument("--finetune-options", default=None,
                    help='the finetune truth\'s protocol as YAML, e.g. "{lrs: [1e-4, 1e-3], epochs: 3, batch_size: '
                         '128, holdout: 0.2}"')
    pr.add_argument("--finetune-dir", default=None,
                    help="where the finetune truth's runs go (default: <out>_finetune/); rerun to resume")
    pr.add_argument("--pretrained", action="store_true",
                    help="timm:NAME models load timm's pretrained weights (needs internet or timm's local cache)")
    pr.add_argument("--plot", default=None, help="scores-vs-truth figure (default: <out>.png with --truth)")

    pl = sub.add_parser("list", help="list registered parts")
    pl.add_argument("kind", nargs="?", default="all",
                    help="methods | views | masks | backbones | datasets | objectives | heads | decoders | scores | "
                         "tasks | all")

    pk = sub.add_parser("data", help="data tools: pack a dataset into WebDataset shards for streaming")
    dsub = pk.add_subparsers(dest="verb", required=True)
    dp = dsub.add_parser("pack", help="write a dataset's splits as WebDataset tar shards (data.dataset=shards streams them)")
    dp.add_argument("--dataset", required=True, help="a name from `visrep list datasets`")
    dp.add_argument("--data-dir", default=None, help="the dataset's folder or archive (default: $VISREP_DATA)")
    dp.add_argument("--dataset-options", default=None, help='dataset options as YAML, e.g. "{task: age}"')
    dp.add_argument("--out", required=True, help="folder for the shards and index.json")
    dp.add_argument("--splits", default=None,
                    help="comma-separated splits to pack (default: a folder's split folders, else train,test)")
    dp.add_argument("--shard-size", default="1GB", help="bytes per shard, such as 1GB or 256MB (default 1GB)")
    dp.add_argument("--max-count", type=int, default=None, help="at most this many samples per shard")
    dp.add_argument("--resize", type=int, default=None, help="store images with this short side (re-encoded JPEG)")
    dp.add_argument("--format", default="jpg", choices=["jpg", "png"],
                    help="encoding of sources held as pixels (CIFAR, faces); folders keep their files' encoding")
    dp.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    dp.add_argument("--seed", type=int, default=0, help="seed of the order samples are written in")

    pd = sub.add_parser("demo", help="offline demo: SimCLR on bundled digits vs random init (~2 min on 2 cores)")
    pd.add_argument("--out-dir", default="runs/demo")
    pd.add_argument("--epochs", type=int, default=None)
    return parser


def _yaml_mapping(text: str | None, flag: str) -> dict | None:
    import yaml

    from visrep.errors import ConfigError

    if text is None:
        return None
    from visrep.config import yaml_error_where, yaml_load

    try:
        value = yaml_load(text)  # 1e-4 is a number, as in config files
    except yaml.YAMLError as e:
        raise ConfigError(f"{flag} is not valid YAML at {yaml_error_where(e)}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a YAML mapping such as '{{cifar_stem: true}}', got {text!r}")
    return value


def _finished_line(summary: dict) -> str:
    line = f"nothing to do: the run in {summary['out_dir']} "
    if summary["already_finished"] == "max_steps":
        return (line + f"reached train.max_steps at step {summary['steps']}/{summary['total_steps']}; nothing was "
                "changed; pass train.max_steps=N (or null) to continue it")
    return line + f"already finished at step {summary['steps']}/{summary['total_steps']}; nothing was changed"


def _print_json(res: dict) -> None:
    keys = ("protocol", "top1", "top5", "ci95", "mae", "rmse", "nme", "failure_rate", "ece", "plot", "seconds")
    slim = {k: v for k, v in res.items() if k in keys}
    if res.get("protocol") == "fewshot":
        slim["results"] = [{k: r[k] for k in ("shots", "ways", "top1", "ci95", "episodes")} for r in res["results"]]
    print(json.dumps(slim, indent=2))


def _parse(argv: list[str] | None):
    """argparse, but dotted overrides (`key.sub=value`) may stand anywhere on the line, also after options."""
    from visrep.errors import ConfigError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [x for x in extra if "=" in x and not x.startswith("-")]
    rest = [x for x in extra if x not in overrides]
    if rest:
        raise ConfigError(f"unrecognized argument{'s' if len(rest) > 1 else ''} {' '.join(rest)}; see visrep "
                          f"{args.command} --help")
    if overrides and args.command not in ("pretrain", "finetune"):
        raise ConfigError(f"visrep {args.command} takes no key=value overrides, got {overrides[0]!r}")
    if args.command in ("pretrain", "finetune"):
        args.overrides = list(args.overrides) + overrides
        if isinstance(args.resume, str) and "=" in args.resume and not os.path.exists(args.resume):
            # `--resume key=value`: an override, not a folder (unless a folder of that name exists)
            args.overrides.append(args.resume)
            args.resume = True
    return args


def run(argv: list[str] | None = None) -> int:
    from visrep import api

    args = _parse(argv)
    if args.command in ("pretrain", "finetune"):
        overrides = list(args.overrides) + ([f"data.root={args.data_dir}"] if args.data_dir else [])
        if isinstance(args.resume, str):  # --resume RUN_DIR
            cfg = api.resume_config(args.resume, overrides, config=args.config)
            if args.command == "pretrain" and cfg.finetune.init:
                from visrep.errors import ConfigError

                raise ConfigError(f"'{args.resume}' is a fine-tuning run; continue it with visrep finetune --resume "
                                  f"{args.resume}, which also exports and evaluates it")
        else:
            cfg = api.resolve(args.config, overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
    if args.command == "finetune":
        summary = api.finetune(cfg, resume=bool(args.resume), force=args.force)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
        if summary.get("already_finished"):
            print(_finished_line(summary))
            return 0
        ev = summary.get("eval", {})
        metric = ", ".join(f"{k} {ev[k]:.4f}" for k in ("top1", "mae", "nme") if k in ev)
        print(f"done: {summary['steps']}/{summary['total_steps']} steps ({summary['stop_reason']}), mode "
              f"{summary['mode']}, trainable parameters {summary['trainable_parameters']:,} of "
              f"{summary['total_parameters']:,}" + (f"; test {metric}" if metric else "")
              + (f"; exported {summary['export']}" if "export" in summary else ""))
        return 0
    if args.command == "pretrain":
        summary = api.pretrain(cfg, resume=bool(args.resume), force=args.force)
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
            return 0
        if summary.get("already_finished"):
            print(_finished_line(summary))
            return 0
        last = summary["history"][-1] if summary["history"] else {}
        print(f"done: {summary['steps']}/{summary['total_steps']} steps ({summary['stop_reason']}), "
              f"final loss {summary['final_loss']:.4f}"
              + (f", kNN top-1 {last['knn_top1']:.3f}" if "knn_top1" in last else "")
              + f"; checkpoint {summary['checkpoint']}")
        return 0
    if args.command == "eval" and args.protocol == "faceptor":
        from visrep.evaluate.faces import evaluate_faceptor

        res = evaluate_faceptor(args.model, root=args.data_dir, image_size=args.image_size, batch_size=args.batch_size,
                                device=args.device, test_subset=args.test_subset, seed=args.seed, out=args.out,
                                force=args.force)
        slim = {name: {k: r[k] for k in ("metric", r["metric"], "failure_rate", "test_size") if k in r}
                for name, r in res["tasks"].items()}
        print(json.dumps({"protocol": "faceptor", "tasks": slim, "figures": res.get("figures"),
                          "seconds": res["seconds"]}, indent=2))
        return 0
    if args.command == "predict":
        from visrep.evaluate.faces import predict_images

        rows = predict_images(args.model, args.images, device=args.device)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                print(row["image"])
                for task, pred in row.items():
                    if task != "image":
                        print(f"  {task}: " + ", ".join(f"{k} {v}" for k, v in pred.items()))
        return 0
    if args.command == "eval":
        common = dict(dataset=args.dataset, root=args.data_dir, train_split=args.train_split,
                      test_split=args.test_split, image_size=args.image_size, branch=args.branch,
                      batch_size=args.batch_size, device=args.device, train_subset=args.train_subset,
                      test_subset=args.test_subset, seed=args.seed, out=args.out, force=args.force,
                      backbone_options=_yaml_mapping(args.backbone_options, "--backbone-options"),
                      dataset_options=_yaml_mapping(args.dataset_options, "--dataset-options"))
        if args.label_fraction is not None:
            if args.protocol not in ("knn", "linear", "calibration"):
                from visrep.errors import ConfigError

                raise ConfigError(f"--label-fraction applies to eval knn, linear and calibration, not {args.protocol}")
            common["label_fraction"] = args.label_fraction
        if args.protocol == "knn":
            res = api.evaluate_knn(args.model, k=args.k, temperature=args.temperature, **common)
        elif args.protocol == "fewshot":
            res = api.evaluate_fewshot(args.model, shots=args.shots, ways=args.ways, queries=args.queries,
                                       episodes=args.episodes, **common)
        elif args.protocol == "calibration":
            res = api.evaluate_calibration(args.model, head=args.head, n_bins=args.bins, plot=args.plot, **common)
        elif args.protocol == "classifier":
            drop = ("train_split", "train_subset", "branch", "backbone_options")
            res = api.evaluate_classifier(args.model, **{k: v for k, v in common.items() if k not in drop})
        else:
            extra = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr),
                                       ("weight_decay", args.weight_decay)) if v is not None}
            res = api.evaluate_linear(args.model, solver=args.solver, **common, **extra)
        _print_json(res)
        return 0
    if args.command == "study" and args.verb == "run":
        from visrep.study import run_study

        res = run_study(args.study, workers=args.workers, executor=args.executor,
                        executor_options=_yaml_mapping(args.executor_options, "--executor-options"))
        print(f"study {res['study']}: {len(res['done'])} runs done now, {len(res['skipped'])} already done, "
              f"{len(res['failed'])} failed; results in {res['store']}")
        for run_id, error in res["failed"].items():
            print(f"  failed {run_id}: {error}")
        return 1 if res["failed"] else 0
    if args.command == "study" and args.verb == "report":
        from visrep.study import report

        res = report(args.study, out=args.out, bootstrap=args.bootstrap, tensorboard=args.tensorboard)
        print(f"study {res['study']}: report at {res['html']} ({res['runs_reported']} runs, "
              f"{res['tasks']} tasks; {res['missing']} run x evaluation results missing)")
        return 0
    if args.command == "study" and args.verb == "status":
        from visrep.study import status

        st = status(args.study)
        for r in st["runs"]:
            factors = ", ".join(f"{k}={v}" for k, v in r["factors"].items())
            print(f"{r['run_id']}  {r['state']:8s}  {factors}" + (f"  ({r['error']})" if r["error"] else ""))
        print("  ".join(f"{k}: {v}" for k, v in st["counts"].items()))
        return 0
    if args.command == "study":
        from visrep.study import format_plan, plan

        p = plan(args.study)
        print(format_plan(p), end="")
        if args.json:
            from visrep.cache import atomic_write

            text = json.dumps(p.to_dict(), indent=2, default=str) + "\n"
            atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(text))
            print(f"wrote {args.json}")
        return 0
    if args.command == "rank":
        from visrep.rank.api import format_table, rank

        if args.label_fraction is not None or args.branch != "student":
            from visrep.errors import ConfigError

            raise ConfigError("visrep rank takes neither --label-fraction nor --branch")
        res = rank(args.models, dataset=args.dataset, root=args.data_dir, train_split=args.train_split,
                   test_split=args.test_split, dataset_options=_yaml_mapping(args.dataset_options, "--dataset-options"),
                   scores=[x.strip() for x in args.scores.split(",") if x.strip()] if args.scores is not None else None,
                   truth=args.truth, image_size=args.image_size, train_subset=args.train_subset,
                   test_subset=args.test_subset, batch_size=args.batch_size, device=args.device, seed=args.seed,
                   backbone_options=_yaml_mapping(args.backbone_options, "--backbone-options"), force=args.force,
                   pretrained=args.pretrained, finetune_dir=args.finetune_dir,
                   score_options=_yaml_mapping(args.score_options, "--score-options"),
                   finetune_options=_yaml_mapping(args.finetune_options, "--finetune-options"),
                   out=args.out, plot=args.plot)
        print(format_table(res), end="")
        if "out" in res:
            print(f"wrote {res['out']}" + (f" and {res['plot']}" if "plot" in res else ""))
        return 0
    if args.command == "data":
        from visrep.data.pack import pack
        from visrep.data.streaming import INDEX_NAME

        index = pack(args.dataset, args.out, root=args.data_dir, splits=[x for x in args.splits.split(",") if x] if args.splits else None,
                     options=_yaml_mapping(args.dataset_options, "--dataset-options"), shard_size=args.shard_size,
                     max_count=args.max_count, resize=args.resize, image_format=args.format, quality=args.quality,
                     seed=args.seed, progress=sys.stderr.isatty())
        for split, e in index["splits"].items():
            print(f"{split}: {e['n']} samples in {len(e['shards'])} shards ({e['bytes'] / 2**20:.1f} MiB)"
                  + (f", {len(e['skipped'])} unreadable skipped" if e["skipped"] else ""))
        first = next(iter(index["splits"].values()))["shards"]
        print(f"wrote {args.out}/{INDEX_NAME}; train with data.dataset=shards data.root={args.out} "
              f"(or data.root={args.out}/{first[0].rsplit('-', 1)[0]}-{{000000..{len(first) - 1:06d}}}.tar)")
        return 0
    if args.command == "list":
        print(api.format_listing(args.kind))
        return 0
    if args.command == "demo":
        from visrep.demo import run_demo

        run_demo(out_dir=args.out_dir, epochs=args.epochs)
        return 0
    return 2


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    # Reports such as "skipped 5 malformed records" read as one line, without a source excerpt.
    return f"visrep: warning: {message}\n"


def main(argv: list[str] | None = None) -> None:
    import warnings

    from visrep.errors import VisrepError

    warnings.formatwarning = _one_line_warning
    try:
        code = run(argv)
    except VisrepError as e:
        print(f"visrep: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("visrep: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
