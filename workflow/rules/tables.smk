# Paper tables and figures: aggregate run metrics into results/*.csv and *.png.


rule table:
    input:
        metrics=lambda wildcards: get_plan_inputs(get_table_kind(wildcards)),
        extra=get_table_extra_inputs,
    output:
        report(plan.TABLE, caption="../report/table.rst", category="Tables"),
    log:
        "logs/tables/{table}.log",
    wildcard_constraints:
        table=get_table_names(),
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        kind=get_table_kind,
        rows=lambda wildcards: get_plan_rows(get_table_kind(wildcards)),
        paper=lambda wildcards: tables.compares_to_paper(
            config, get_table_kind(wildcards)
        ),
    script:
        "../scripts/table.py"


rule fig4:
    input:
        get_plan_inputs("table4"),
    output:
        report("results/fig4.png", caption="../report/fig4.rst", category="Figures"),
    log:
        "logs/figures/fig4.log",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        rows=get_plan_rows("table4"),
    script:
        "../scripts/fig4.py"


rule fig6:
    input:
        get_fig6_caches,
    output:
        png=report("results/fig6.png", caption="../report/fig6.rst", category="Figures"),
        csv="results/fig6.csv",
    log:
        "logs/figures/fig6.log",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        backbones=config["backbones"],
        n_items=config["fig6_items"],
        demo=config["fig6_demo"],
        cache_dtype=config["cache"]["dtype"],
    script:
        "../scripts/fig6.py"


rule fig7:
    input:
        get_plan_inputs("fig7"),
    output:
        png=report("results/fig7.png", caption="../report/fig7.rst", category="Figures"),
        csv="results/fig7.csv",
    log:
        "logs/figures/fig7.log",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        rows=get_plan_rows("fig7"),
    script:
        "../scripts/fig7.py"


rule efficiency:
    input:
        [p for _, p in tables.efficiency_plan(config)],
    output:
        csv="results/efficiency.csv",
        png=report("results/fig5.png", caption="../report/fig5.rst", category="Figures"),
    log:
        "logs/figures/fig5.log",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        rows=[r for r, _ in tables.efficiency_plan(config)],
    script:
        "../scripts/efficiency.py"


rule claims:
    input:
        unpack(lambda wildcards: get_claims_inputs()),
    output:
        report(plan.CLAIMS, caption="../report/claims.rst", category="Tables"),
    log:
        "logs/tables/claims.log",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        paper={
            k: tables.runs_on_paper_data(config, k)
            for k in config["tables"] + config["figures"]
        },
    script:
        "../scripts/claims.py"
