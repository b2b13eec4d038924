# IISAN-Versa reproducibility workflow. See README.md; the stages live in workflow/rules/.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/tables.smk"


rule all:
    default_target: True
    input:
        all_targets(),
