# Data stage: generate a demo dataset (Amazon or MicroLens format) or fetch the published files,
# then preprocess (docs/method.md §1). Each rule serves the datasets whose kind lists it, and rule
# preprocess reads the raw files their kind names (iisan.data.kinds).


rule generate_demo:
    output:
        items_tsv=plan.RAW.replace("{kind}", "items"),
        users_tsv=plan.RAW.replace("{kind}", "users"),
        images=plan.RAW_IMAGES,
    log:
        "logs/data/{dataset}/generate.log",
    wildcard_constraints:
        dataset=get_datasets_made_by("generate_demo"),
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=lambda wildcards: get_dataset_source(wildcards.dataset).get("demo", {}),
    script:
        "../scripts/demo_data.py"


rule fetch_amazon:
    input:
        unpack(get_rehearsal_inputs),
    output:
        plan.RAW,
    log:
        "logs/data/{dataset}/fetch_{kind}.log",
    wildcard_constraints:
        dataset=get_datasets_made_by("fetch_amazon"),
        kind="items|users",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    params:
        relpath=lambda wildcards: get_dataset_source(wildcards.dataset)[wildcards.kind],
        sha256=lambda wildcards: get_dataset_source(wildcards.dataset)
        .get("sha256", {})
        .get(wildcards.kind),
        mirror=config["mirror"],
        base_url=config["download_url"],
    script:
        "../scripts/fetch.py"


# Downloads run on the host that runs Snakemake: cluster compute nodes often have no internet.
localrules:
    fetch_amazon,
    fetch_amazon_images,
    fetch_microlens,


rule fetch_amazon_images:
    input:
        unpack(get_rehearsal_inputs),
    output:
        plan.RAW_IMAGES,
    log:
        "logs/data/{dataset}/fetch_images.log",
    wildcard_constraints:
        dataset=get_datasets_made_by("fetch_amazon_images"),
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=120,
    params:
        images=lambda wildcards: get_dataset_source(wildcards.dataset)["images"],
        mirror=config["mirror"],
    script:
        "../scripts/fetch_images.py"


rule generate_microlens_demo:
    output:
        pairs=plan.MICROLENS_RAW.replace("{name}", microlens.PAIRS),
        titles=plan.MICROLENS_RAW.replace("{name}", microlens.TITLES),
        covers=plan.MICROLENS_RAW.replace("{name}", microlens.COVERS),
        videos=directory(plan.MICROLENS_VIDEOS),
    log:
        "logs/data/{dataset}/generate.log",
    wildcard_constraints:
        dataset=get_datasets_made_by("generate_microlens_demo"),
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=lambda wildcards: get_dataset_source(wildcards.dataset).get(
            "microlens_demo", {}
        ),
    script:
        "../scripts/microlens_demo.py"


rule fetch_microlens:
    input:
        unpack(get_rehearsal_inputs),
    output:
        plan.MICROLENS_RAW,
    log:
        "logs/data/{dataset}/fetch_{name}.log",
    wildcard_constraints:
        dataset=get_datasets_made_by("fetch_microlens"),
        name="|".join(re.escape(n) for n in MICROLENS_FILES.values()),
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=120,
    params:
        relpath=get_microlens_relpath,
        sha256=get_microlens_sha256,
        mirror=config["mirror"],
        base_url=lambda wildcards: get_dataset_source(wildcards.dataset).get(
            "url", microlens.SITE
        ),
    script:
        "../scripts/fetch.py"


rule preprocess:
    input:
        unpack(get_preprocess_inputs),
    output:
        item_table=plan.ITEMS,
        sequences=plan.SEQUENCES,
        popularity=plan.POPULARITY,
        stats=plan.STATS,
    log:
        "logs/data/{dataset}/preprocess.log",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        missing_images=lambda wildcards: get_dataset_source(wildcards.dataset)[
            "missing_images"
        ],
        bad_lines=config["bad_lines"],
        preprocess=config["preprocess"],
    script:
        "../scripts/preprocess.py"


# `snakemake --keep-going --configfile config/paper.yaml -- fetch`: everything the run needs from
# the network, fetched on the host that runs Snakemake before any cluster job (the MicroLens
# videos need that dataset's preprocessing first, which runs here too).
rule fetch:
    input:
        get_fetch_inputs(),
    localrule: True
