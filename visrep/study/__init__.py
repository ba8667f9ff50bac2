"""Studies: a grid of runs over one base config, a fair budget, and the evaluations each run gets.

    visrep.study.plan("studies/demo.yaml")          # validate: every run and evaluation, with ids and cost
    visrep.study.run_study("studies/demo.yaml", workers=2)   # run what is missing, resumably
    visrep.study.status("studies/demo.yaml")        # done / failed / started / pending per run
    visrep.study.report("studies/demo.yaml")        # aggregate into <out_dir>/report/index.html (+ PNG, JSON, CSV)

Results: each run's JSON files, collected into one SQLite store (`ResultsStore`); `aggregate` holds the formulas.
"""
from visrep.study.plan import Plan, PlannedEvaluation, PlannedRun, format_plan, plan
from visrep.study.report import report
from visrep.study.run import run_study, status
from visrep.study.store import ResultsStore, metrics_of

__all__ = ["plan", "format_plan", "run_study", "status", "report", "ResultsStore", "metrics_of", "Plan", "PlannedRun",
           "PlannedEvaluation"]
