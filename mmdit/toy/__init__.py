"""The toy world: coloured shapes on grey, captioned like GenEval's prompts, small enough that an SD3-architecture
pipeline trains on it on a CPU and plain image analysis judges it.

    world       the scenes, their captions, the held-out set, the prompt file, the dataset (no torch)
    components  its VAE (trained on its images), text towers and tokenizers, saved as a diffusers SD3 pipeline
    detector    the judge's eyes: connected regions read as shapes and palette colours, as GenEval's Detections
    prepare     the world built on disk, and a toy recipe's shards precomputed from it (train.py's data.prepare)
"""
