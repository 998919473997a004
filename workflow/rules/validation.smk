# Stage 5: tables and a figure that check the method itself: exactness against the dense
# autograd Hessian, invariance under function-preserving rescaling, Hutchinson convergence
# to the exact trace, and the cost of every measure. Part of the default target.


rule validation_exactness:
    output:
        csv=report(
            "results/tables/validation/exactness.csv",
            caption="../report/validation.rst",
            category="validation",
        ),
        md="results/tables/validation/exactness.md",
    log:
        "results/logs/validation/exactness.log",
    benchmark:
        "results/benchmarks/validation/exactness.tsv"
    conda:
        "../../envs/convflat.yaml"
    threads: res("validation", "threads")
    resources:
        mem_mb=res("validation", "mem_mb"),
        runtime=res("validation", "runtime"),
    params:
        table="exactness",
        validation=validation_slice("exactness"),
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
        table="invariance|hutchinson|cost",
    conda:
        "../../envs/convflat.yaml"
    threads: res("validation", "threads")
    resources:
        mem_mb=res("validation", "mem_mb"),
        runtime=res("validation", "runtime"),
        gpu=gpus("measure"),
    params:
        table=lambda wildcards: wildcards.table,
        validation=lambda wildcards: validation_slice(wildcards.table),
        device=config["device"],
        version=code_version("validation"),
    script:
        "../scripts/validation.py"


rule hutchinson_figure:
    input:
        table="results/tables/validation/hutchinson.csv",
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
