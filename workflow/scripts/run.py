# One experiment: train and evaluate it (rule train; resumes from checkpoint.pt beside its output
# when restarted), or time a few of its training steps at one batch size (rule profile, Fig. 5).
# With IISAN_WORKER set, a warm `iisan worker` runs it without this process's imports (iisan.pipeline.worker).
import sys

from iisan.pipeline.worker import run

sys.exit(run("iisan.pipeline.jobs:run_job", snakemake))
