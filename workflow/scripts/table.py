# Aggregate the runs' metrics into one paper table.
from iisan.jobs import job
from iisan.tables import build_table

with job(snakemake):
    cited = snakemake.input.cited
    build_table(snakemake.params.kind, snakemake.params.rows, snakemake.input.metrics, snakemake.output[0],
                cited=cited[0] if cited else None)
