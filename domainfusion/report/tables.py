"""Results tables in the layout of DomainBed's `collect_results.py`, as GitHub Markdown or LaTeX.

Numbers are computed as DomainBed does (mean over trial seeds, standard error with numpy's population std), so a
table produced here can sit next to the published DomainBed tables.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import UserError
from .records import Record, group_records, load_records, num_envs, row_name, split_incomparable
from .selection import IIDAccuracySelection, SelectionMethod


@dataclass(frozen=True)
class TrialResult:
    """The selected model of one (dataset, algorithm, test_env, trial_seed) cell."""

    dataset: str
    algorithm: str
    test_env: int
    trial_seed: int
    test_acc: float
    val_acc: float
    hparams_seed: int


def trial_results(records: Sequence[Record], selection: SelectionMethod) -> list[TrialResult]:
    """Apply `selection` to every group; groups it cannot score are left out, as DomainBed does."""
    results = []
    for group in group_records(records):
        ranked = selection.hparams_accs(group.records)
        if ranked:
            acc, run = ranked[0]
            results.append(
                TrialResult(
                    group.dataset,
                    group.algorithm,
                    group.test_env,
                    group.trial_seed,
                    acc.test_acc,
                    acc.val_acc,
                    run[0]["args"]["hparams_seed"],
                )
            )
    return results


def per_trial_rows(records: Sequence[Record], selection: SelectionMethod) -> list[dict[str, Any]]:
    """JSON-ready rows of the raw numbers behind the tables, so they can be re-aggregated elsewhere."""
    return [asdict(result) for result in trial_results(records, selection)]


def format_mean(accs: Sequence[float], latex: bool) -> tuple[float | None, str]:
    """Mean and standard error in percent, as DomainBed's `format_mean`; "X" when there is no data."""
    if not accs:
        return None, "X"
    mean = 100 * float(np.mean(accs))
    err = 100 * float(np.std(accs)) / np.sqrt(len(accs))
    pm = "$\\pm$" if latex else "±"
    return mean, f"{mean:.1f} {pm} {err:.1f}"


def results_table(
    records: Sequence[Record],
    selection: SelectionMethod,
    latex: bool = False,
    env_names: Mapping[str, Sequence[str]] | None = None,
    algorithm_order: Sequence[str] = (),
    strict: bool = False,
) -> str:
    """One table per dataset (algorithms x test envs + Avg) and a final averages table (algorithms x datasets).

    `env_names` gives column headers and the dataset order (datasets it lacks follow, sorted, with env indices
    as headers); `algorithm_order` lists algorithms to put first, like DomainBed's ALGORITHMS list.
    By default a cell averages whatever trial seeds have a result, exactly as DomainBed; `strict=True` shows
    "X" instead whenever a trial seed present in the dataset's records lacks a result for that cell.
    Incomparable runs are renamed apart first (`split_incomparable`): `env_names` keys are the new dataset names.
    """
    env_names = env_names or {}
    records = split_incomparable(records)
    results = trial_results(records, selection)
    datasets = _ordered({r["args"]["dataset"] for r in records}, env_names)
    algorithms = _ordered({row_name(r["args"]) for r in records}, algorithm_order)
    render = _latex_table if latex else _markdown_table

    blocks = [f"\\subsection{{Model selection: {selection.name}}}"] if latex else []
    n_envs: dict[str, int] = {}
    trial_seeds: dict[str, set[int]] = {}
    for dataset in datasets:
        dataset_records = [r for r in records if r["args"]["dataset"] == dataset]
        n_envs[dataset] = len(env_names[dataset]) if dataset in env_names else max(num_envs(r) for r in dataset_records)
        trial_seeds[dataset] = {r["args"]["trial_seed"] for r in dataset_records}
        headers = list(env_names.get(dataset, map(str, range(n_envs[dataset]))))
        rows = []
        for algorithm in algorithms:
            cells, means = [], []
            for test_env in range(n_envs[dataset]):
                accs = {
                    r.trial_seed: r.test_acc
                    for r in results
                    if (r.dataset, r.algorithm, r.test_env) == (dataset, algorithm, test_env)
                }
                if strict and set(accs) != trial_seeds[dataset]:
                    accs = {}
                mean, cell = format_mean([accs[seed] for seed in sorted(accs)], latex)
                cells.append(cell)
                means.append(mean)
            rows.append([algorithm, *cells, _avg_cell(means)])
        blocks.append(
            render(
                dataset,
                f"Dataset: {dataset}, model selection method: {selection.name}",
                ["Algorithm", *headers, "Avg"],
                rows,
            )
        )

    rows = []
    for algorithm in algorithms:
        cells, means = [], []
        for dataset in datasets:
            per_trial: dict[int, list[float]] = {}
            for r in results:
                if (r.dataset, r.algorithm) == (dataset, algorithm):
                    per_trial.setdefault(r.trial_seed, []).append(r.test_acc)
            if strict:
                complete = {s: accs for s, accs in per_trial.items() if len(accs) == n_envs[dataset]}
                per_trial = complete if set(complete) == trial_seeds[dataset] else {}
            # DomainBed averages, per trial, over whichever test envs that trial has results for.
            mean, cell = format_mean([float(np.mean(per_trial[s])) for s in sorted(per_trial)], latex)
            cells.append(cell)
            means.append(mean)
        rows.append([algorithm, *cells, _avg_cell(means)])
    blocks.append(
        render("Averages", f"Averages, model selection method: {selection.name}", ["Algorithm", *datasets, "Avg"], rows)
    )
    return "\n\n".join(blocks) + "\n"


def latex_document(body: str) -> str:
    """Wrap LaTeX tables into a compilable document with the packages DomainBed's tables need."""
    return (
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{adjustbox}\n\\begin{document}\n"
        "\\section{Full DomainBed results}\n\n" + body + "\n\\end{document}\n"
    )


def _ordered(names: Iterable[str], preferred: Iterable[str]) -> list[str]:
    """`preferred` names that occur first, in that order, then the rest sorted, so tables are reproducible."""
    names = set(names)
    first = [n for n in preferred if n in names]
    return first + sorted(names - set(first))


def _avg_cell(means: Sequence[float | None]) -> str:
    """Mean of the column means; "X" if any is missing, since an average over fewer envs is not comparable."""
    if not means or any(m is None for m in means):
        return "X"
    return f"{sum(means) / len(means):.1f}"


def _markdown_table(_title: str, header_text: str, col_labels: list[str], rows: list[list[str]]) -> str:
    """GitHub pipe table under a heading, columns padded so the raw text is readable in a terminal too."""
    table = [col_labels, *rows]
    widths = [max(len(row[c]) for row in table) for c in range(len(col_labels))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(cells, widths)) + " |"

    return "\n".join(
        [f"### {header_text}", "", line(col_labels), line(["-" * w for w in widths]), *(line(row) for row in rows)]
    )


def _latex_table(title: str, _header_text: str, col_labels: list[str], rows: list[list[str]]) -> str:
    """booktabs tabular in a width-capped adjustbox under a \\subsubsection, as DomainBed prints it."""
    header = " & ".join(f"\\textbf{{{_latex_escape(label)}}}" for label in col_labels) + " \\\\"
    body = [" & ".join([_latex_escape(row[0]), *row[1:]]) + " \\\\" for row in rows]
    return "\n".join(
        [
            f"\\subsubsection{{{_latex_escape(title)}}}",
            "",
            "\\begin{center}",
            "\\adjustbox{max width=\\textwidth}{%",
            "\\begin{tabular}{l" + "c" * (len(col_labels) - 1) + "}",
            "\\toprule",
            header,
            "\\midrule",
            *body,
            "\\bottomrule",
            "\\end{tabular}}",
            "\\end{center}",
        ]
    )


def _latex_escape(text: str) -> str:
    """Escape the characters that occur in env/algorithm names (e.g. ColoredMNIST's "+90%") and break LaTeX."""
    for char in "&%$#_":
        text = text.replace(char, "\\" + char)
    return text


def selected_accuracies(run_dir: str, algorithm: str | None = None) -> dict[int, float]:
    """{held-out env index: test accuracy} of the runs in `run_dir` under training-domain validation, averaged over
    trial seeds (DomainBed's selection); `algorithm` picks one when the folder holds several."""
    results = trial_results(load_records(run_dir), IIDAccuracySelection())
    algorithms = sorted({r.algorithm for r in results})
    if not results:
        raise UserError(f"{run_dir} holds no finished run records to compare with")
    if algorithm is None and len(algorithms) > 1:
        raise UserError(f"{run_dir} holds runs of {', '.join(algorithms)}: name one with --compare-algorithm")
    chosen = algorithm or algorithms[0]
    if chosen not in algorithms:
        raise UserError(f"{run_dir} holds no {chosen} runs (it has {', '.join(algorithms)})")
    accs: dict[int, list[float]] = defaultdict(list)
    for r in results:
        if r.algorithm == chosen:
            accs[r.test_env].append(r.test_acc)
    return {env: sum(v) / len(v) for env, v in accs.items()}
