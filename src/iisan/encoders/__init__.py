"""Backbones and their caches: the backbone-family registry (`families`), backbone entries, stand-ins
and loading (`backbones`, `tokenizers`), hidden-state caches (`cache`, `cache_files`; a cache job's settings `cache_job`), the item
inputs a backbone reads (`item_inputs`), the fine-tuning baselines' adapters (`finetune`) and
fetching models (`models_fetch`, `parts`)."""
