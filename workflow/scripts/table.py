# Aggregate the runs' metrics into one paper table (with the paper's numbers beside ours on the
# paper's datasets).
from iisan.pipeline.jobs import job
from iisan.tables import build_table

with job(snakemake):
    build_table(snakemake.params.kind, snakemake.params.rows, snakemake.input.metrics, snakemake.output[0],
                extra=snakemake.input.extra, with_paper=snakemake.params.paper)
