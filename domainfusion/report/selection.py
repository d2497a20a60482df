"""DomainBed's three model-selection methods, with its exact tie-breaking, so reported numbers are comparable.

Each method turns the records of one (trial_seed, dataset, algorithm, test_env) group into one test accuracy:
`run_acc` picks a checkpoint inside one hparam run, `hparams_accs` ranks the runs by validation accuracy and
`sweep_acc` reports the test accuracy of the best one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .records import Record, num_envs


@dataclass(frozen=True)
class RunAcc:
    """Validation accuracy used for selection and the test accuracy it selects (fractions, not percent)."""

    val_acc: float
    test_acc: float


def _group_by(records: Sequence[Record], key: Callable[[Record], Hashable]) -> list[list[Record]]:
    """Split records by `key`, groups ordered by key and records kept in input order (as DomainBed's Q.group)."""
    groups: dict[Any, list[Record]] = defaultdict(list)
    for record in records:
        groups[key(record)].append(record)
    return [groups[k] for k in sorted(groups)]


def _single_test_env(records: Sequence[Record]) -> list[Record]:
    """Records of runs that held out only the group's test env (2-env runs exist only for leave-one-out)."""
    return [r for r in records if len(r["args"]["test_envs"]) == 1]


def _step(record: Record) -> int:
    return record["step"]


def _nan_last(acc: float) -> float:
    """Sort key that ranks NaN validation accuracies below everything, as DomainBed's Q.sorted does."""
    return -math.inf if math.isnan(acc) else acc


class SelectionMethod(ABC):
    """Strategy choosing (hparams, checkpoint) per group; subclasses only define how a single run is scored."""

    name: ClassVar[str]

    @abstractmethod
    def run_acc(self, run_records: Sequence[Record]) -> RunAcc | None:
        """Best validation accuracy of one hparam run and its test accuracy; None if the run cannot be scored."""

    def hparams_accs(self, records: Sequence[Record]) -> list[tuple[RunAcc, list[Record]]]:
        """Score each hparam run of one group, best validation accuracy first.

        Ascending stable sort then reversal, exactly as DomainBed: on a tie the larger hparams_seed wins.
        """
        scored = []
        for run in _group_by(records, lambda r: r["args"]["hparams_seed"]):
            acc = self.run_acc(run)
            if acc is not None:
                scored.append((acc, run))
        return sorted(scored, key=lambda pair: _nan_last(pair[0].val_acc))[::-1]

    def sweep_acc(self, records: Sequence[Record]) -> float | None:
        """Test accuracy of the best hparam run in one group, or None when no run can be scored."""
        ranked = self.hparams_accs(records)
        return ranked[0][0].test_acc if ranked else None


class OracleSelection(SelectionMethod):
    """Test-domain validation: the held-out domain's out split ranks runs, always at the last checkpoint.

    Using the last checkpoint (no early stopping) limits how much the oracle can exploit test-domain data.
    """

    name = "test-domain validation set (oracle)"

    def run_acc(self, run_records: Sequence[Record]) -> RunAcc | None:
        test_records = _single_test_env(run_records)
        if not test_records:
            return None
        test_env = test_records[0]["args"]["test_envs"][0]
        last = sorted(test_records, key=_step)[-1]
        return RunAcc(val_acc=last[f"env{test_env}_out_acc"], test_acc=last[f"env{test_env}_in_acc"])


class IIDAccuracySelection(SelectionMethod):
    """Training-domain validation: the checkpoint maximising mean out-split accuracy over the training envs."""

    name = "training-domain validation set"

    @staticmethod
    def _step_acc(record: Record) -> RunAcc:
        test_env = record["args"]["test_envs"][0]
        val_accs = [record[f"env{i}_out_acc"] for i in range(num_envs(record)) if i != test_env]
        return RunAcc(val_acc=float(np.mean(val_accs)), test_acc=record[f"env{test_env}_in_acc"])

    def run_acc(self, run_records: Sequence[Record]) -> RunAcc | None:
        test_records = _single_test_env(run_records)
        if not test_records:
            return None
        # max() keeps the first maximum, i.e. the earliest record in file order on ties, like DomainBed.
        return max((self._step_acc(r) for r in test_records), key=lambda acc: acc.val_acc)


class LeaveOneOutSelection(SelectionMethod):
    """Leave-one-domain-out cross-validation over the runs trained with test_envs {test_env, j}.

    At each step, the validation accuracy is the mean over training envs j of env j's in-split accuracy in
    the run that also held out j; a step missing any such run is not scored.
    """

    name = "leave-one-domain-out cross-validation"

    @staticmethod
    def _step_acc(step_records: Sequence[Record]) -> RunAcc | None:
        test_records = _single_test_env(step_records)
        if len(test_records) != 1:
            return None
        test_env = test_records[0]["args"]["test_envs"][0]
        n_envs = num_envs(step_records[0])
        held_out_accs: dict[int, float] = {}
        for record in step_records:
            test_envs = record["args"]["test_envs"]
            if len(test_envs) == 2 and test_env in test_envs:
                (val_env,) = set(test_envs) - {test_env}
                held_out_accs[val_env] = record[f"env{val_env}_in_acc"]
        val_envs = [j for j in range(n_envs) if j != test_env]
        if any(j not in held_out_accs for j in val_envs):
            return None
        return RunAcc(
            val_acc=sum(held_out_accs[j] for j in val_envs) / len(val_envs),
            test_acc=test_records[0][f"env{test_env}_in_acc"],
        )

    def run_acc(self, run_records: Sequence[Record]) -> RunAcc | None:
        step_accs = [
            acc for step_records in _group_by(run_records, _step) if (acc := self._step_acc(step_records)) is not None
        ]
        # Steps are in increasing order, so a tie goes to the earliest step, like DomainBed.
        return max(step_accs, key=lambda acc: acc.val_acc) if step_accs else None


SELECTION_METHODS: dict[str, SelectionMethod] = {
    "iid": IIDAccuracySelection(),
    "loo": LeaveOneOutSelection(),
    "oracle": OracleSelection(),
}
