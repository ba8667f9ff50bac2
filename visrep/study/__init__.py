"""Studies: a grid of runs over one base config, a fair budget, and the evaluations each run gets.

`plan` (this stage's first verb) resolves and validates a study YAML; running, the results store and the
report are the next steps of issue 11.
"""
from visrep.study.plan import Plan, PlannedEvaluation, PlannedRun, format_plan, plan

__all__ = ["plan", "format_plan", "Plan", "PlannedRun", "PlannedEvaluation"]
