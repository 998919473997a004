"""Floor 3: does a flatness measure predict generalization? Statistics, tables, figures.

Input is a runs table (one row per trained run; see ``docs/internal-api.md``): columns
``hp_<axis>`` are hyperparameters, ``m_<name>`` measures, and ``loss_gap``, ``acc_gap``,
``test_error`` the default targets. Runs with ``status != "ok"`` or ``converged == False``
are left out and counted. A good measure correlates *positively* with the targets.

* :mod:`convflat.analysis.stats`: Kendall tau with a bootstrap CI, Spearman, Pearson, the
  granulated Kendall coefficient Psi (per axis too) and the conditional mutual information
  score of Jiang et al. (2020), gathered by :func:`correlation_table`.
  :func:`spread_ratio` (between- over within-configuration sd of a gap) and
  :func:`convergence_summary` (the matched-loss accounting) describe the runs themselves.
* :mod:`convflat.analysis.tables`: CSV / Markdown / LaTeX (booktabs) tables, best marked.
* :mod:`convflat.analysis.headline`: ``headline.md``, the study's answer in words and one
  small table per target (:func:`write_headline`).
* :mod:`convflat.analysis.figures`: seaborn figures (PNG + PDF) for a paper column, among
  them the flatness over training (:func:`plot_flatness_over_training`).

The workflow's jobs call these functions (:mod:`convflat.pipeline.analysis` and the figures
of :data:`convflat.pipeline.registry.FIGURES`).
"""

from convflat.analysis.controls import add_controls
from convflat.analysis.figures import (
    FLATNESS_KEYS,
    figure_paths,
    load_histories,
    plot_false_friend,
    plot_flatness_over_training,
    plot_hutchinson_convergence,
    plot_measure_vs_gap,
    plot_psi_heatmap,
    plot_sign_error,
    plot_tau_psi,
)
from convflat.analysis.headline import (
    DEFAULT_MIN_RUNS,
    HEADLINE_TARGETS,
    HeadlineSettings,
    TargetAnswer,
    headline_markdown,
    headline_rows,
    target_answer,
    write_headline,
)
from convflat.analysis.paired import (
    PairedDifference,
    paired_psi_difference,
    paired_tau_difference,
)
from convflat.analysis.robustness import one_axis_pairs, sign_error_table
from convflat.analysis.runs import (
    DEFAULT_TARGETS,
    NUISANCE_AXES,
    OURS,
    RunSelection,
    axis_columns,
    combine_runs,
    measure_columns,
    read_runs,
    select_runs,
)
from convflat.analysis.stats import (
    BootstrapCI,
    CMIResult,
    ConvergenceSummary,
    PsiResult,
    SpreadRatio,
    axis_groups,
    bootstrap_kendall,
    bootstrap_weights,
    conditional_mutual_information,
    convergence_summary,
    correlation_table,
    granulated_kendall,
    kendall_tau,
    pearson,
    spearman,
    spread_ratio,
)
from convflat.analysis.tables import (
    correlation_latex,
    correlation_markdown,
    read_correlation_table,
    runs_summary_table,
    write_correlation_table,
    write_runs_summary,
)

__all__ = [
    "DEFAULT_MIN_RUNS",
    "DEFAULT_TARGETS",
    "FLATNESS_KEYS",
    "HEADLINE_TARGETS",
    "NUISANCE_AXES",
    "OURS",
    "BootstrapCI",
    "CMIResult",
    "ConvergenceSummary",
    "HeadlineSettings",
    "PairedDifference",
    "PsiResult",
    "RunSelection",
    "SpreadRatio",
    "TargetAnswer",
    "add_controls",
    "axis_columns",
    "axis_groups",
    "bootstrap_kendall",
    "bootstrap_weights",
    "combine_runs",
    "conditional_mutual_information",
    "convergence_summary",
    "correlation_latex",
    "correlation_markdown",
    "correlation_table",
    "figure_paths",
    "granulated_kendall",
    "headline_markdown",
    "headline_rows",
    "kendall_tau",
    "load_histories",
    "measure_columns",
    "one_axis_pairs",
    "paired_psi_difference",
    "paired_tau_difference",
    "pearson",
    "plot_false_friend",
    "plot_flatness_over_training",
    "plot_hutchinson_convergence",
    "plot_measure_vs_gap",
    "plot_psi_heatmap", "plot_sign_error",
    "plot_tau_psi",
    "read_correlation_table",
    "read_runs",
    "runs_summary_table",
    "select_runs",
    "sign_error_table",
    "spearman",
    "spread_ratio",
    "target_answer",
    "write_correlation_table",
    "write_headline",
    "write_runs_summary",
]
