"""Train one stage of the audio_moe three-stage recipe (see moezoo/models/audio_moe/recipe.py).

    python training/audio_moe/train.py --config training/audio_moe/configs/1_specialist_speech.yaml [key=value ...]
    accelerate launch training/audio_moe/train.py --config training/audio_moe/configs/3_joint.yaml trainer.max_steps=2000

Order: 1_specialist_speech, 1_specialist_music, 2_integrate, 3_joint. Every stage resumes from its newest checkpoint
(trainer.resume: auto) and writes <output_dir>/final for the next stage.
"""
from moezoo.models.audio_moe.recipe import train_from_config
from moezoo.trainer import parse_config_args

if __name__ == "__main__":
    out = train_from_config(parse_config_args(description=__doc__), progress=True)
    print(f"stage {out['stage']} done -> {out['final']}")
