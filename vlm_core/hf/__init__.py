"""Hugging Face interoperability: import pretrained parts, export trained models.

    load.py        model=hf: CLIP/SigLIP tower + Llama/Qwen2 LLM folders -> native VLM
    export.py      python -m vlm_core.hf.export CHECKPOINT OUT_DIR -> LlavaForConditionalGeneration folder
    mapping.py     weight names and layouts in both directions
    checkpoint.py  a project checkpoint -> VLM + config + tokenizer (shared with python -m vlm_core.eval)
    folders.py     reading a local HF folder (config, safetensors)

Nothing here touches the network, and weights are read with safetensors only.
"""
