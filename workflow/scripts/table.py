# Aggregate the runs' metrics into one paper table.
from iisan.jobs import job
from iisan.tables import build_table

with job(snakemake):
    build_table(snakemake.params.kind, snakemake.params.rows, snakemake.input, snakemake.output[0])
