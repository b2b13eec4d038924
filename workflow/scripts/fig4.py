# Fig. 4: IISAN-VA test HR@10 per text encoder, grouped as in the paper.
from iisan.pipeline.jobs import job
from iisan.tables.figures import fig4

with job(snakemake):
    fig4(snakemake.params.rows, snakemake.input, snakemake.output[0])
