# Stage 5: tables and a figure that check the method itself (convflat.pipeline.registry
# .VALIDATION_TABLES): exactness against the dense autograd Hessian, invariance under
# function-preserving rescaling, Hutchinson convergence to the exact trace, and the cost of
# every measure. Part of the default target.


rule validation_reference:
    output:
        csv=report(
            "results/tables/validation/{table}.csv",
            caption="../report/validation.rst",
            category="validation",
        ),
        md="results/tables/validation/{table}.md",
    log:
        "results/logs/validation/{table}.log",
    benchmark:
        "results/benchmarks/validation/{table}.tsv"
    wildcard_constraints:
        table=tables_where(uses_model=False),
    conda:
        "../../envs/convflat.yaml"
    threads: res("validation", "threads")
    resources:
        mem_mb=res("validation", "mem_mb"),
        runtime=res("validation", "runtime"),
    params:
        table=lambda wildcards: wildcards.table,
        caption=lambda wildcards: VALIDATION_TABLES[wildcards.table].caption,
        validation=lambda wildcards: validation_slice(wildcards.table),
        device="cpu",
        version=code_version("validation"),
    script:
        "../scripts/validation.py"


rule validation_model:
    input:
        unpack(validation_inputs),
    output:
        csv=report(
            "results/tables/validation/{table}.csv",
            caption="../report/validation.rst",
            category="validation",
        ),
        md="results/tables/validation/{table}.md",
    log:
        "results/logs/validation/{table}.log",
    benchmark:
        "results/benchmarks/validation/{table}.tsv"
    wildcard_constraints:
        table=tables_where(uses_model=True),
    conda:
        "../../envs/convflat.yaml"
    threads: res("validation", "threads")
    resources:
        mem_mb=res("validation", "mem_mb"),
        runtime=res("validation", "runtime"),
        gpu=gpus("measure"),
    params:
        table=lambda wildcards: wildcards.table,
        caption=lambda wildcards: VALIDATION_TABLES[wildcards.table].caption,
        validation=lambda wildcards: validation_slice(wildcards.table),
        device=config["device"],
        version=code_version("validation"),
    script:
        "../scripts/validation.py"


rule hutchinson_figure:
    input:
        table=rules.validation_model.output.csv.format(table="hutchinson"),
    output:
        png=report(
            "results/figures/validation/hutchinson_convergence.png",
            caption="../report/hutchinson.rst",
            category="validation",
        ),
        pdf="results/figures/validation/hutchinson_convergence.pdf",
    log:
        "results/logs/validation/hutchinson_figure.log",
    benchmark:
        "results/benchmarks/validation/hutchinson_figure.tsv"
    conda:
        "../../envs/convflat.yaml"
    threads: 1
    resources:
        mem_mb=res("analysis", "mem_mb"),
        runtime=res("analysis", "runtime"),
    params:
        model=lambda wildcards: validation_inputs(wildcards)["model"],
        version=code_version("validation"),
    script:
        "../scripts/hutchinson_figure.py"
