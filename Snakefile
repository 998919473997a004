# convflat: from dataset to figures, tables and rendered notebooks.
#
#   snakemake --cores all --profile profiles/local                   full reproduction (GPU)
#   snakemake --cores all --configfile config/quick.yaml             offline CPU study, minutes
#   snakemake --report results/report.html [--configfile ...]        the HTML report
#   snakemake results/figures/<study>/measure_vs_gap.png             rebuild one figure
#
# The stages live in workflow/rules/*.smk, the code in workflow/scripts/*.py (thin) and in
# the convflat library (everything that computes). See docs/workflow.md.

from snakemake.utils import min_version

min_version("9.0")


# A --configfile on the command line replaces the default instead of being merged into it
# (Snakemake would otherwise keep the default's studies next to the quick study's).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/validation.smk"
include: "workflow/rules/report.smk"


report: "workflow/report/workflow.rst"


onstart:
    startup_message()


rule all:
    default_target: True
    input:
        all_targets(),
