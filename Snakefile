# IISAN-Versa reproducibility workflow. See README.md; the stages live in workflow/rules/.
import sys
from pathlib import Path

from snakemake.utils import min_version, update_config

import iisan.pipeline.worker
from iisan.config import typed
from iisan.pipeline.workflow import (
    DEFAULT_CONFIG,
    check_config,
    load_yaml,
    refuse_stale_report,
    validate,
    warn_future_files,
)

min_version("9.0")

# the workflow's default config lives beside this Snakefile, whatever the working directory;
# load_yaml reads it first so that a YAML error names its file, line and column (Snakemake's
# own message names none)
DEFAULT_CONFIGFILE = str(Path(workflow.basedir) / DEFAULT_CONFIG)
load_yaml(DEFAULT_CONFIGFILE)


configfile: DEFAULT_CONFIGFILE


report: "workflow/report/workflow.rst"


# `--config key=value` values arrive as strings: read them as YAML, like the config files
update_config(config, typed(dict(workflow.config_settings.config)))

# the schema (config/schemas/, with each table's section from the table registry), its defaults,
# and the checks no schema can make; an error names the key
validate(config, workflow.basedir)
check_config(config)

# outputs dated ahead of this machine's clock (a file server's clock ahead) mislead Snakemake's
# comparisons of file times: name them, once, in the main process (dry runs too; jobs skip it)
if workflow.is_main_process:
    warn_future_files()
    # a report packs the tables and figures as they are: refuse it while one of them no longer
    # stands for its runs (a run deleted, failed or retrained since the table was built)
    if any(a == "--report" or a.startswith("--report=") for a in sys.argv):
        refuse_stale_report(config)


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/captions.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/tables.smk"


# config `rehearsal: true` (config/rehearsal.yaml): the fetch rules' sources made locally
if config["rehearsal"]:

    include: "workflow/rules/rehearsal.smk"


# config `worker: true`: one warm worker for this run's local train and profile jobs (iisan.pipeline.worker)
WORKER = {}


onstart:
    WORKER["process"] = iisan.pipeline.worker.start_for_workflow(
        config["worker"], workflow.local_exec
    )


onsuccess:
    iisan.pipeline.worker.stop_for_workflow(WORKER.get("process"))


onerror:
    iisan.pipeline.worker.stop_for_workflow(WORKER.get("process"))
    # `snakemake --keep-going ... fetch` ends with what could not be fetched, and why
    failed = fetch_failures()
    if failed:
        print(
            f"fetch: {len(failed)} of {len(get_fetch_inputs())} not fetched:",
            file=sys.stderr,
        )
        for path, why in failed:
            print(f"  {path}: {why}", file=sys.stderr)


rule all:
    default_target: True
    input:
        get_targets(),
