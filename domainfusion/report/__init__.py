"""Sweep reporting with DomainBed's exact semantics: load results, select models, print tables, plot curves."""

from .costs import cost_table, run_costs
from .plots import plot_accuracy_vs_step
from .records import RecordGroup, group_records, load_records, split_incomparable
from .selection import (
    SELECTION_METHODS,
    IIDAccuracySelection,
    LeaveOneOutSelection,
    OracleSelection,
    RunAcc,
    SelectionMethod,
)
from .tables import latex_document, per_trial_rows, results_table

__all__ = [
    "SELECTION_METHODS",
    "IIDAccuracySelection",
    "LeaveOneOutSelection",
    "OracleSelection",
    "RecordGroup",
    "RunAcc",
    "SelectionMethod",
    "cost_table",
    "group_records",
    "latex_document",
    "load_records",
    "per_trial_rows",
    "plot_accuracy_vs_step",
    "results_table",
    "run_costs",
    "split_incomparable",
]
