# Stage 3: every configured flatness measure of one trained run (ours in closed form, and
# the baselines) on a seeded subset of its training data.


rule measure:
    input:
        model=rules.train.output.model,
        init=rules.train.output.init,
        record=rules.train.output.record,
        data=run_prepared,
    output:
        measures="results/runs/{study}/{run_id}/measures.json",
    log:
        "results/logs/measure/{study}/{run_id}.log",
    benchmark:
        "results/benchmarks/measure/{study}/{run_id}.tsv"
    conda:
        "../../envs/convflat.yaml"
    threads: res("measure", "threads")
    resources:
        mem_mb=res("measure", "mem_mb"),
        runtime=res("measure", "runtime"),
        gpu=gpus("measure"),
    params:
        measure=lambda wildcards: STUDIES[wildcards.study]["measure"],
        device=config["device"],
        version=code_version("measure"),
    script:
        "../scripts/measure.py"
