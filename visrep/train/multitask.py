"""The training data of a multi-task run (Faceptor): every task's training split, and for a stage-2 run the
stage-1 model's tasks, so its query tables are rebuilt whole while only the target task trains."""
from __future__ import annotations

from visrep.config import RunConfig
from visrep.data.multitask import MultiTaskData
from visrep.data.tasks import load_task_data, num_queries, trained_tasks
from visrep.errors import ConfigError
from visrep.runs import stage1_tasks


def load_task_training_data(cfg: RunConfig, saved: dict | None = None) -> MultiTaskData:
    """Every task's training split at data.image_size, with data.subset / holdout / label_fraction applied to each."""
    d = cfg.data
    specs = trained_tasks(cfg.tasks, cfg.task_head)
    datasets, queries = {}, {}
    stage2 = (cfg.task_head or {}).get("stage2")
    if stage2:  # Faceptor stage 2: the stage-1 model's tasks (its query tables), trained on the target task only
        # (a resumed run was built already: its own checkpoint says how, and the stage-1 run may have moved since)
        queries = {n: tuple(v) for n, v in saved["tasks"].items()} if saved and "tasks" in saved else \
            stage1_tasks(stage2["init"], stage2["task"])
    from visrep.train.state import training_split  # (state imports this module)

    for spec in specs:
        ds = load_task_data(spec, spec.split, root=d.root, image_size=d.image_size, download=d.download)
        fraction = spec.label_fraction if spec.label_fraction is not None else d.label_fraction
        datasets[spec.name] = ds = training_split(ds, d, cfg.seed, fraction)
        q = (spec.output, num_queries(spec, ds))
        if tuple(queries.setdefault(spec.name, q)) != q:
            raise ConfigError(f"task '{spec.name}' is {q} here and {tuple(queries[spec.name])} in the stage-1 run")
    return MultiTaskData(datasets, {s.name: s for s in specs}, queries)
