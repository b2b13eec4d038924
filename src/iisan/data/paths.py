"""Where the workflow keeps a dataset's raw files (the fetch and generate rules' outputs; the
dataset kinds, `iisan.data.kinds`, name them as their preprocessing's inputs)."""

RAW = "resources/raw/{dataset}/{kind}.tsv"  # kind: items | users
RAW_IMAGES = "resources/raw/{dataset}/images.zip"  # the demo's generated covers
MICROLENS_RAW = "resources/raw/{dataset}/{name}"  # name: MicroLens-100k_pairs.tsv | _title_en.csv | covers.zip
