"""Build the offline codecs on real speech + music (the neural ones for the same CPU time each), keep the best one
(held-out log-mel distance), save it with save_pretrained and write codec_comparison.json (per task: log-mel distance,
multi-resolution log-mel distance, SI-SNR). ``--evaluate DIR ...`` also scores already-saved codec folders on the same
held-out clips.

    python training/audio_moe/train_codec.py --kinds mel_rvq dac encodec --minutes 0.25 --out runs/audio_codec
"""
import argparse
import json
from pathlib import Path

from moezoo.models.audio_moe.codec import AudioCodec
from moezoo.models.audio_moe.codec_training import _held_out_clips, compare_and_save, evaluate
from moezoo.models.audio_moe.data_audio import asterisk_speech, sonic_pi_music, split_items

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="CPU minutes per neural codec")
    ap.add_argument("--kinds", nargs="+", default=["mel_rvq", "dac", "encodec"])
    ap.add_argument("--out", default="runs/audio_codec")
    ap.add_argument("--held-out", type=int, default=12, help="held-out clips per task")
    ap.add_argument("--evaluate", nargs="*", default=[], help="saved codec folders to score on the same clips")
    args = ap.parse_args()
    tr_s, te_s = split_items(asterisk_speech(), 0.1)
    tr_m, te_m = split_items(sonic_pi_music(), 0.15)
    held_out = {"speech": te_s[: args.held_out], "music": te_m[: args.held_out]}
    summary = compare_and_save(tr_s + tr_m, held_out, args.out, minutes=args.minutes, kinds=args.kinds,
                               log=lambda m: print(m, flush=True))
    if args.evaluate:
        clips = _held_out_clips(held_out)
        summary["evaluated"] = {d: evaluate(AudioCodec.from_pretrained(d).model, "saved", clips) for d in args.evaluate}
        (Path(args.out) / "codec_comparison.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
