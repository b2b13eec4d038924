# Paper tables: aggregate run metrics into results/*.csv (test-set percentages).


rule table:
    input:
        table_metrics,
    output:
        report(
            "results/{table}.csv",
            caption="../report/table.rst",
            category="Tables",
        ),
    log:
        "logs/tables/{table}.log",
    wildcard_constraints:
        table=table_names(),
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        kind=table_kind,
        rows=table_rows_json,
    shell:
        "iisan table --kind {params.kind} --rows {params.rows} --metrics {input} --out {output:q} > {log} 2>&1"


rule fig4:
    input:
        plan_metrics("table4"),
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
        rows=plan_rows_json("table4"),
    shell:
        "iisan figure --kind fig4 --rows {params.rows} --metrics {input} --out {output:q} > {log} 2>&1"


rule fig6:
    input:
        fig6_caches,
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
        backbones=fig6_backbones_json(),
        manifests=lambda wildcards, input: " ".join(
            shlex.quote(os.path.join(os.path.dirname(a), "manifest.json"))
            for a in input
        ),
        n_items=config.get("fig6_items", 20825),
        demo="--demo" if config.get("fig6_demo", True) else "",
    shell:
        "iisan figure --kind fig6 --backbones {params.backbones} --items {params.n_items} {params.demo}"
        " --metrics {params.manifests} --out {output.png:q} > {log} 2>&1"


rule fig7:
    input:
        plan_metrics("fig7"),
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
        rows=plan_rows_json("fig7"),
    shell:
        "iisan figure --kind fig7 --rows {params.rows} --metrics {input} --out {output.png:q} > {log} 2>&1"


rule efficiency:
    input:
        [p for _, p in efficiency_plan()],
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
        rows=shlex.quote(json.dumps([r for r, _ in efficiency_plan()])),
    shell:
        "iisan efficiency --rows {params.rows} --profiles {input} --out {output.csv:q} --figure {output.png:q} > {log} 2>&1"
