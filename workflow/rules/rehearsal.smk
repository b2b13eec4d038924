# The rehearsal (config/rehearsal.yaml, `rehearsal: true`): the published files and the hub models
# a real config fetches, made here as small twins and same-family stand-ins in the real formats,
# in a local mirror (config key mirror) and a local hub cache (config key model_cache). The fetch
# rules take these rules' records as inputs (get_rehearsal_inputs) and then run as in the real
# run, offline: HF_HUB_OFFLINE=1 for every job of this run.
import os

from iisan.pipeline import rehearsal
from iisan.encoders.models_fetch import hub_names

os.environ["HF_HUB_OFFLINE"] = "1"


# They stand in for the internet, which the fetch rules reach from the host that runs Snakemake.
localrules:
    rehearsal_mirror,
    rehearsal_hub,


rule rehearsal_mirror:
    output:
        rehearsal.MIRROR_RECORD,
    log:
        "logs/rehearsal/mirror/{dataset}.log",
    wildcard_constraints:
        dataset="|".join(re.escape(n) for n in rehearsal.mirrored(config)) or "(?!)",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        source=lambda wildcards: get_dataset_source(wildcards.dataset),
        mirror=config["mirror"],
    script:
        "../scripts/rehearsal_mirror.py"


rule rehearsal_hub:
    input:
        titles=plan.ITEMS.format(dataset=config["standin_corpus"]),
        prompts=workflow_file(config["captions"]["prompts"]),
    output:
        rehearsal.HUB_RECORD,
    log:
        "logs/rehearsal/hub/{section}/{name}.log",
    wildcard_constraints:
        section="backbones|captioners",
        name="|".join(
            re.escape(n)
            for n in hub_names(config["backbones"]) + hub_names(config["captioners"])
        )
        or "(?!)",
    conda:
        "../../envs/iisan.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        entry=lambda wildcards: config[wildcards.section][wildcards.name],
        cache=config["model_cache"],
    script:
        "../scripts/rehearsal_hub.py"
