# Data stage: generate the demo dataset or fetch the authors' TSVs, then preprocess (docs/method.md §1).


rule generate_demo:
    output:
        items_tsv="resources/raw/{dataset}/items.tsv",
        users_tsv="resources/raw/{dataset}/users.tsv",
        images="resources/raw/{dataset}/images.zip",
    log:
        "logs/data/{dataset}/generate.log",
    wildcard_constraints:
        dataset=datasets_of_kind("demo"),
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=lambda wildcards: shlex.quote(
            json.dumps(dataset_source(wildcards.dataset).get("demo", {}))
        ),
    shell:
        "iisan demo-data --out resources/raw/{wildcards.dataset} --spec {params.spec} > {log} 2>&1"


rule fetch_amazon:
    output:
        "resources/raw/{dataset}/{kind}.tsv",
    log:
        "logs/data/{dataset}/fetch_{kind}.log",
    wildcard_constraints:
        dataset=datasets_of_kind("amazon"),
        kind="items|users",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    params:
        relpath=fetch_relpath,
        sha256=fetch_sha256,
        mirror=config.get("mirror") or "",
        base_url=config["download_url"],
    shell:
        "iisan fetch --relpath {params.relpath:q} --out {output:q} --base-url {params.base_url:q}"
        " --mirror={params.mirror:q} --sha256={params.sha256:q} > {log} 2>&1"


rule preprocess:
    input:
        unpack(preprocess_inputs),
    output:
        item_table="resources/{dataset}/items.parquet",
        sequences="resources/{dataset}/sequences.parquet",
        popularity="resources/{dataset}/popularity.parquet",
        stats="resources/{dataset}/stats.json",
    log:
        "logs/data/{dataset}/preprocess.log",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        images=images_arg,
        missing_images=missing_images_policy,
        bad_lines=config["bad_lines"],
        min_interactions=config["preprocess"]["min_interactions"],
        window=config["preprocess"]["window"],
    shell:
        "iisan preprocess --items {input.items_tsv:q} --users {input.users_tsv:q} --out resources/{wildcards.dataset}"
        " {params.images} --missing-images {params.missing_images} --bad-lines {params.bad_lines}"
        " --min-interactions {params.min_interactions} --window {params.window} > {log} 2>&1"
