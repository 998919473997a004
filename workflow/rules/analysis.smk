# Stage 4: a study's runs -> runs table -> correlation tables and figures; the same over all
# studies pooled ("overall"). Every figure (convflat.pipeline.registry.FIGURES) is its own
# job: naming its file rebuilds it alone. Job code: convflat.pipeline.analysis.


rule collect:
    input:
        records=study_runs(rules.train.output.record),
        measures=study_runs(rules.measure.output.measures),
    output:
        runs=report(
            "results/tables/{study}/runs.csv",
            caption="../report/runs.rst",
            category="{study}",
            subcategory="tables",
        ),
    log:
        "results/logs/collect/{study}.log",
    benchmark:
        "results/benchmarks/collect/{study}.tsv"
    conda:
        "../../envs/convflat.yaml"
    threads: 1
    resources:
        mem_mb=res("analysis", "mem_mb"),
        runtime=res("analysis", "runtime"),
    params:
        run_ids=lambda wildcards: list(RUNS[wildcards.study]),
        hp=lambda wildcards: {r: v.hp for r, v in RUNS[wildcards.study].items()},
        version=code_version("analysis"),
    script:
        "../scripts/collect.py"


rule correlation:
    input:
        runs=rules.collect.output.runs,
    output:
        csv=report(
            "results/tables/{study}/correlation.csv",
            caption="../report/correlation.rst",
            category="{study}",
            subcategory="tables",
        ),
        md="results/tables/{study}/correlation.md",
        tex="results/tables/{study}/correlation.tex",
    log:
        "results/logs/correlation/{study}.log",
    benchmark:
        "results/benchmarks/correlation/{study}.tsv"
    conda:
        "../../envs/convflat.yaml"
    threads: 1
    resources:
        mem_mb=res("analysis", "mem_mb"),
        runtime=res("analysis", "runtime"),
    params:
        analysis=config["analysis"],
        title=lambda wildcards: wildcards.study,
        version=code_version("analysis"),
    script:
        "../scripts/correlation.py"


rule runs_summary:
    input:
        runs=rules.collect.output.runs,
    output:
        csv="results/tables/{study}/runs_summary.csv",
        md="results/tables/{study}/runs_summary.md",
        tex="results/tables/{study}/runs_summary.tex",
    log:
        "results/logs/runs_summary/{study}.log",
    benchmark:
        "results/benchmarks/runs_summary/{study}.tsv"
    conda:
        "../../envs/convflat.yaml"
    threads: 1
    resources:
        mem_mb=res("analysis", "mem_mb"),
        runtime=res("analysis", "runtime"),
    params:
        analysis=config["analysis"],
        version=code_version("analysis"),
    script:
        "../scripts/runs_summary.py"


rule tau_along:
    input:
        runs=rules.collect.output.runs,
        records=study_runs(rules.train.output.record),
    output:
        csv="results/tables/{study}/tau_along_training.csv",
        md=report(
            "results/tables/{study}/tau_along_training.md",
            caption="../report/tau_along.rst",
            category="{study}",
            subcategory="tables",
        ),
        png=report(
            "results/figures/{study}/tau_along_training.png",
            caption="../report/tau_along.rst",
            category="{study}",
            subcategory="figures",
        ),
        pdf="results/figures/{study}/tau_along_training.pdf",
    log:
        "results/logs/tau_along/{study}.log",
    benchmark:
        "results/benchmarks/tau_along/{study}.tsv"
    conda:
        "../../envs/convflat.yaml"
    threads: 1
    resources:
        mem_mb=res("analysis", "mem_mb"),
        runtime=res("analysis", "runtime"),
    params:
        analysis=config["analysis"],
        run_ids=lambda wildcards: list(RUNS[wildcards.study]),
        version=code_version("analysis"),
    script:
        "../scripts/tau_along.py"


rule headline:
    input:
        unpack(headline_inputs),
    output:
        md=report(
            "results/tables/{study}/headline.md",
            caption="../report/headline.rst",
            category="{study}",
            subcategory="tables",
        ),
    log:
        "results/logs/headline/{study}.log",
    benchmark:
        "results/benchmarks/headline/{study}.tsv"
    conda:
        "../../envs/convflat.yaml"
    threads: 1
    resources:
        mem_mb=res("analysis", "mem_mb"),
        runtime=res("analysis", "runtime"),
    params:
        analysis=config["analysis"],
        version=code_version("analysis"),
    script:
        "../scripts/headline.py"


rule figure:
    input:
        unpack(figure_inputs),
    output:
        png=report(
            "results/figures/{study}/{figure}.png",
            caption="../report/figure.rst",
            category="{study}",
            subcategory="figures",
        ),
        pdf="results/figures/{study}/{figure}.pdf",
        # what the report says under the figure; computed from the runs where the figure
        # states a finding (its registry entry has explain), else its fixed caption
        caption="results/figures/{study}/{figure}.caption.rst",
    log:
        "results/logs/figure/{study}/{figure}.log",
    benchmark:
        "results/benchmarks/figure/{study}/{figure}.tsv"
    wildcard_constraints:
        figure="|".join(FIGURES),
    conda:
        "../../envs/convflat.yaml"
    threads: 1
    resources:
        mem_mb=res("analysis", "mem_mb"),
        runtime=res("analysis", "runtime"),
    params:
        figure=lambda wildcards: wildcards.figure,
        caption=lambda wildcards: FIGURES[wildcards.figure].caption,
        computed_caption=lambda wildcards: FIGURES[wildcards.figure].computed_caption,
        analysis=config["analysis"],
        version=code_version("analysis"),
    script:
        "../scripts/figure.py"


rule overall_correlation:
    input:
        runs=expand(rules.collect.output.runs, study=STUDIES),
    output:
        csv=report(
            "results/tables/overall/correlation.csv",
            caption="../report/correlation.rst",
            category="overall",
            subcategory="tables",
        ),
        md="results/tables/overall/correlation.md",
        tex="results/tables/overall/correlation.tex",
    log:
        "results/logs/correlation/overall.log",
    benchmark:
        "results/benchmarks/correlation/overall.tsv"
    conda:
        "../../envs/convflat.yaml"
    threads: 1
    resources:
        mem_mb=res("analysis", "mem_mb"),
        runtime=res("analysis", "runtime"),
    params:
        analysis=config["analysis"],
        title="overall",
        version=code_version("analysis"),
    script:
        "../scripts/correlation.py"


rule overall_figure:
    input:
        correlation=rules.overall_correlation.output.csv,
    output:
        png=report(
            "results/figures/overall/{figure}.png",
            caption="../report/figure.rst",
            category="overall",
            subcategory="figures",
        ),
        pdf="results/figures/overall/{figure}.pdf",
    log:
        "results/logs/figure/overall/{figure}.log",
    benchmark:
        "results/benchmarks/figure/overall/{figure}.tsv"
    wildcard_constraints:
        figure="|".join(name for name, f in FIGURES.items() if f.overall),
    conda:
        "../../envs/convflat.yaml"
    threads: 1
    resources:
        mem_mb=res("analysis", "mem_mb"),
        runtime=res("analysis", "runtime"),
    params:
        figure=lambda wildcards: wildcards.figure,
        caption=lambda wildcards: FIGURES[wildcards.figure].caption,
        analysis=config["analysis"],
        version=code_version("analysis"),
    script:
        "../scripts/figure.py"
