"""vlm_core: the model, kernels, data path, training and evaluation of the data-metabolism platform."""
