"""Rules figure / overall_figure / false_friend: one figure (PNG + PDF) of a study.

``measure_vs_gap`` and ``false_friend`` draw from the runs table, ``tau_psi`` and
``psi_heatmap`` from the correlation table; convflat.analysis draws.
"""

import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from _common import start

log = start(snakemake)  # noqa: F821
from pathlib import Path  # noqa: E402

import convflat.analysis as A  # noqa: E402

sm = snakemake  # noqa: F821
cfg = sm.params.analysis
figure = sm.params.figure
out = Path(sm.output.png).with_suffix("")
if figure == "measure_vs_gap":
    paths = A.plot_measure_vs_gap(A.read_runs(sm.input.runs), out, target=cfg["targets"][0],
                                  require_converged=cfg["require_converged"])
elif figure == "false_friend":
    paths = A.plot_false_friend(A.read_runs(sm.input.runs), out,
                                require_converged=cfg["require_converged"])
elif figure == "tau_psi":
    paths = A.plot_tau_psi(sm.input.correlation, out)
elif figure == "psi_heatmap":
    paths = A.plot_psi_heatmap(sm.input.correlation, out)
else:
    raise ValueError(f"unknown figure {figure!r}")
log.info("wrote %s", [str(p) for p in paths])
