# Fig. 4: IISAN-VA test HR@10 per text encoder, grouped as in the paper.
from iisan.figures import fig4
from iisan.jobs import job

with job(snakemake):
    fig4(snakemake.params.rows, snakemake.input, snakemake.output[0])
