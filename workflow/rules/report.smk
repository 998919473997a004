# Stage 6: notebooks. The template (notebooks/<name>.ipynb) is an input; papermill runs it
# with the study's files as parameters and the executed copy is the output; nbconvert then
# renders it to one self-contained HTML file without the code of cells tagged parameters or
# hide-input (convflat.pipeline.report.render_html). `snakemake --report` gathers everything.


rule overview_notebook:
    input:
        template=notebook_template("overview"),
        runs=rules.collect.output.runs,
        correlation=rules.correlation.output.csv,
        figures=lambda wildcards: [
            rules.figure.output.png.format(study=wildcards.study, figure=name)
            for name, fig in FIGURES.items()
            if fig.wanted(STUDIES[wildcards.study])
        ],
    output:
        notebook="results/notebooks/{study}/overview.ipynb",
    log:
        "results/logs/notebook/{study}/overview.log",
    benchmark:
        "results/benchmarks/notebook/{study}/overview.tsv"
    conda:
        "../../envs/convflat.yaml"
    threads: 1
    resources:
        mem_mb=res("notebook", "mem_mb"),
        runtime=res("notebook", "runtime"),
    params:
        parameters=lambda wildcards, input: {
            "study": wildcards.study,
            "runs_csv": input.runs,
            "correlation_csv": input.correlation,
            "figures_dir": f"results/figures/{wildcards.study}",
            "description": STUDIES[wildcards.study]["description"],
            "targets": config["analysis"]["targets"],
            "require_converged": config["analysis"]["require_converged"],
            "min_runs": config["analysis"]["min_runs"],
            "sign_error_noise_z": config["analysis"]["sign_error_noise_z"],
        },
        timeout=config["notebooks"]["timeout"],
        version=code_version("notebook"),
    script:
        "../scripts/render_notebook.py"


rule validation_notebook:
    input:
        template=notebook_template("validation"),
        tables=expand(rules.validation_model.output.csv, table=VALIDATION_TABLES),
        figure=rules.hutchinson_figure.output.png,
    output:
        notebook="results/notebooks/validation.ipynb",
    log:
        "results/logs/notebook/validation.log",
    benchmark:
        "results/benchmarks/notebook/validation.tsv"
    conda:
        "../../envs/convflat.yaml"
    threads: 1
    resources:
        mem_mb=res("notebook", "mem_mb"),
        runtime=res("notebook", "runtime"),
    params:
        parameters={
            "tables_dir": "results/tables/validation",
            "figures_dir": "results/figures/validation",
        },
        timeout=config["notebooks"]["timeout"],
        version=code_version("notebook"),
    script:
        "../scripts/render_notebook.py"


rule notebook_html:
    input:
        notebook="results/notebooks/{path}.ipynb",
    output:
        html=report(
            "results/notebooks/{path}.html",
            caption="../report/notebook.rst",
            category="notebooks",
        ),
    log:
        "results/logs/notebook_html/{path}.log",
    benchmark:
        "results/benchmarks/notebook_html/{path}.tsv"
    conda:
        "../../envs/convflat.yaml"
    threads: 1
    resources:
        mem_mb=res("notebook", "mem_mb"),
        runtime=res("notebook", "runtime"),
    script:
        "../scripts/render_html.py"


# snakemake --report: only the files that exist, and the landing page's summary (built here,
# once every rule exists; see report_only_what_exists in common.smk)
if building_a_report(sys.argv):
    # what the landing page (workflow/report/workflow.rst) opens with
    config["report_landing"] = report_only_what_exists()
    if config["report_landing"]["missing"]:
        missing = config["report_landing"]["missing"]
        logger.warning(
            f"convflat: {len(missing)} file(s) of the workflow do not exist and are left "
            "out of the report (its landing page lists them):\n"
            + "\n".join(f"    {m}" for m in missing)
        )
