"""The model and its training: methods (`methods`), LayerDrop (`layerdrop`), the side networks,
user encoders and Recommender (`model`), features from caches or backbones in the loop
(`features`), the training loop and step (`train`, `fast_step`), one run on several processes
(`distributed`), loss and metrics, and one experiment from its spec (`experiment`)."""
