"""The toy world: coloured shapes on grey, captioned like GenEval's prompts, small enough that an SD3-architecture
pipeline trains on it on a CPU and plain image analysis judges it.

    world       the scenes, their captions, the held-out set, the prompt file, the dataset (no torch)
    components  its VAE (trained on its images), text towers and tokenizers, saved as a diffusers SD3 pipeline
    towers      how its text towers are trained (contrastively against its pictures, near misses as negatives)
    probes      what a set of towers tells the MM-DiT, by linear probes (python3 -m mmdit.toy.probes)
    detector    the judge's eyes: connected regions read as shapes and palette colours, as GenEval's Detections
    prepare     the world built on disk, and a toy recipe's shards precomputed from it (train.py's data.prepare)
    evaluate    toy GenEval of a run's checkpoints: seen and held-out, per attribute, a learning curve
"""

from pathlib import Path

BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "toy_pipeline"   # the trained toy pipeline, shipped
TOY_CFG = 2.0   # the toy pipelines' guidance: SD3's 7 darkens their colours and tints their background
# Skip-layer guidance (SD3.5 Medium's, on its blocks 7-9 of 24) on the toy MM-DiT's blocks 2 and 3 of 6: in the first
# steps, where each object's shape and place are decided, it pushes away from what the model draws without them,
# and the recipe's squares and triangles stop melting into rounded blobs (README, "Measured").
TOY_SLG_LAYERS = (2, 3)
TOY_SAMPLING = {"cfg": TOY_CFG, "slg_layers": list(TOY_SLG_LAYERS)}   # every toy pipeline's mmdit_sampling.json
