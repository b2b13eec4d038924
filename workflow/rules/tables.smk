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
    wildcard_constraints:
        table=table_names(),
    params:
        kind=table_kind,
        rows=table_rows_json,
    log:
        "logs/tables/{table}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "iisan table --kind {params.kind} --rows {params.rows} --metrics {input} --out {output:q} > {log} 2>&1"
